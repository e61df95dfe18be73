"""Writes that read one host (`Store.host_rule`), and a file parsed once for all its
readers, through real balancers on a real Redis and a file: backend edits and
deploys read no whole table in the management process, stay atomic while two
balancers race them on one store, and a file another process rewrote is parsed
once by the management process, its reads and its watcher together."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from balancer.following import FOLLOW_WAIT
from tests.conftest import RedisServer
from tests.redis_hold import SubscriberHold
from tests.support import Backend, Balancer, dead_address, request, wait_for
from tests.test_table_reads import ONE_WORKER, STATIC, WholeReads, settled

RACE = "race.test"
EDITS = 8  # backend edits per balancer, both at once

ONE_REDIS = pytest.mark.xdist_group("one_host_reads")  # the tests sharing `racers`
# no resync tick (which reads the whole table when the version moved without a message
# within `MESSAGE_LAG`, 50 ms): on the balancer behind the relay while messages wait, and
# on the other, whose tick could come just after a write, its message delayed that long
# on a loaded machine (Redis stalled): a whole read no test here is about, counted
QUIET_ENV = {"BALANCER_STORE_RESYNC_INTERVAL": "120"}
# the balancer behind the relay: its workers' debug lines too
HELD_ENV = {"BALANCER_LOG_LEVEL": "debug", **QUIET_ENV}


def management_pid(bal: Balancer) -> int:
    found = re.search(r"management (\d+) ready", bal.output())
    assert found is not None, bal.output()
    return int(found.group(1))


@pytest.fixture(scope="module")
def racers(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Balancer, Balancer, WholeReads, SubscriberHold]]:
    """Two balancers on one private Redis serving `RACE` (a proxy rule) beside 50
    static hosts, the Redis's whole reads, and the relay the first balancer reaches
    Redis through (which can hold back what its watchers hear)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    client = redis.Redis.from_url(server.url)
    hosts = {f"h{n}.test": {**STATIC, "body": f"h{n}"} for n in range(50)}
    hosts[RACE] = {"action": "proxy", "backends": [dead_address()]}
    client.hset("balancer:hosts", mapping={h: json.dumps(r) for h, r in hosts.items()})
    client.set("balancer:version", 1)
    client.close()
    reads = WholeReads(server.port)
    hold = SubscriberHold(server.port)
    one = Balancer(tmp_path_factory.mktemp("a"), None, store=f"redis://127.0.0.1:{hold.port}/0",
                   args=ONE_WORKER, env=HELD_ENV)
    two = Balancer(tmp_path_factory.mktemp("b"), None, store=server.url, args=ONE_WORKER,
                   env=QUIET_ENV)
    try:
        settled(one, two)
        reads.settled()
        yield one, two, reads, hold
    finally:
        hold.release()
        reads.close()
        one.stop()
        two.stop()
        hold.close()
        server.close()


def addresses(rule: dict[str, Any]) -> set[str]:
    return {b if isinstance(b, str) else b["address"] for b in rule["backends"]}


@ONE_REDIS
def test_backend_edits_racing_on_two_balancers_read_one_host(
        racers: tuple[Balancer, Balancer, WholeReads, SubscriberHold]) -> None:
    """Both balancers add backends to one host at once: every edit lands (none lost
    to the other's), each is read back on its balancer at its version or later, a
    stale ``If-Match`` is 409, and no process reads the whole table (each edit read
    it in the management process: 1-2 s of CPU at 100,000 hosts on Redis; a mirror
    behind another's write read it again after its own, and so did a worker)."""
    one, two, reads, _ = racers
    before = reads.count()
    problems: list[str] = []

    def edit_loop(bal: Balancer, first: int) -> None:
        for n in range(first, first + EDITS):
            address = f"127.0.0.1:{20000 + n}"
            status, answer = bal.api("POST", f"/api/v1/hosts/{RACE}/backends",
                                     {"address": address})
            if status != 200:
                problems.append(f"{address}: {status} {answer}")
                continue
            status, body = bal.api("GET", f"/api/v1/hosts/{RACE}")
            if body["version"] < answer["version"] or address not in addresses(body["rule"]):
                problems.append(f"{address} not read back at {answer['version']}: {body}")

    threads = [threading.Thread(target=edit_loop, args=(bal, first))
               for bal, first in ((one, 0), (two, EDITS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert problems == []
    status, body = one.api("GET", f"/api/v1/hosts/{RACE}")
    wanted = {f"127.0.0.1:{20000 + n}" for n in range(2 * EDITS)}
    assert status == 200 and wanted <= addresses(body["rule"])
    status, answer = two.api("DELETE", f"/api/v1/hosts/{RACE}/backends/127.0.0.1:20000",
                             headers={"If-Match": f'"{body["version"] - 1}"'})
    assert status == 412 and answer["error"] == "version_conflict", answer
    status, answer = two.api("DELETE", f"/api/v1/hosts/{RACE}/backends/127.0.0.1:20000",
                             headers={"If-Match": f'"{body["version"]}"'})
    assert status == 200 and answer["version"] == body["version"] + 1, answer
    assert reads.count() == before, reads.lines()[before:]


@ONE_REDIS
def test_a_deploy_reads_one_host(
        racers: tuple[Balancer, Balancer, WholeReads, SubscriberHold]) -> None:
    """A deploy's start, switch and finish read the host's rule, not the table."""
    one, _, reads, _ = racers
    backend = Backend("new")
    try:
        before = reads.count()
        status, answer = one.api("POST", f"/api/v1/hosts/{RACE}/deploy",
                                 {"backends": [backend.address], "ready_timeout": 10,
                                  "warmup": 0, "drain_timeout": 2})
        assert status == 202, answer
        path = f"/api/v1/deploys/{answer['deploy']['id']}"
        record = wait_for(lambda: (r := one.api("GET", path)[1]["deploy"])["state"] != "running"
                          and r, 30, what="the deploy to end")
        assert record["state"] == "done", record
        assert addresses(one.api("GET", f"/api/v1/hosts/{RACE}")[1]["rule"]) == \
            {backend.address}
        assert reads.count() == before, reads.lines()[before:]
    finally:
        backend.stop()


WAITING = "which the store's watcher has not delivered yet"  # a worker's debug line


@ONE_REDIS
def test_a_worker_behind_anothers_write_reads_only_the_hosts_written(
        racers: tuple[Balancer, Balancer, WholeReads, SubscriberHold]) -> None:
    """The second balancer writes a host; before the first one's watchers hear of it
    (their messages held back), the first writes another: its worker, told of a
    version that does not follow on the one it serves, waits for its watcher, which
    reads the two hosts written, and the write is answered applied. No process reads
    the whole table (that worker read it: 1-2 s at 100,000 hosts, for every write
    its balancer made right after another balancer's)."""
    one, two, reads, hold = racers
    before, waits = reads.count(), one.output().count(WAITING)
    answers: list[tuple[int, Any]] = []
    hold.hold()
    try:
        status, theirs = two.api("PUT", "/api/v1/hosts/h1.test", {**STATIC, "body": "two's"})
        assert status == 200, theirs
        writer = threading.Thread(target=lambda: answers.append(
            one.api("PUT", "/api/v1/hosts/h2.test", {**STATIC, "body": "one's"})))
        writer.start()
        wait_for(lambda: one.output().count(WAITING) > waits or reads.count() > before, 10,
                 what="the worker told of the write it does not follow on")
    finally:
        hold.release()
    writer.join(30)
    assert answers == [(200, {"version": theirs["version"] + 1})], answers
    for host, body in (("h1.test", b"two's"), ("h2.test", b"one's")):
        assert request(one.port, host=host)[2] == body
    assert reads.count() == before, reads.lines()[before:]


@ONE_REDIS
def test_a_worker_whose_watcher_hears_nothing_reads_the_whole_table_once(
        racers: tuple[Balancer, Balancer, WholeReads, SubscriberHold]) -> None:
    """As above, but the first balancer's watchers hear nothing until its write is
    answered (their messages lost, as far as it can tell): its worker waits
    `FOLLOW_WAIT` for its watcher, then reads the whole table once, and serves
    both writes; when the messages come, nothing more is read."""
    one, two, reads, hold = racers
    before = reads.count()
    hold.hold()
    try:
        status, theirs = two.api("PUT", "/api/v1/hosts/h3.test", {**STATIC, "body": "two's"})
        assert status == 200, theirs
        started = time.monotonic()
        status, answer = one.api("PUT", "/api/v1/hosts/h4.test", {**STATIC, "body": "one's"})
        waited = time.monotonic() - started
        assert (status, answer) == (200, {"version": theirs["version"] + 1}), answer
        assert waited >= FOLLOW_WAIT
        assert reads.count() == before + 1, reads.lines()[before:]
    finally:
        hold.release()
    for host, body in (("h3.test", b"two's"), ("h4.test", b"one's")):
        assert request(one.port, host=host)[2] == body
    wait_for(lambda: f"-> {answer['version']}:" in one.output(), 10,
             what="the management process's table")
    assert reads.count() == before + 1, reads.lines()[before:]


@ONE_REDIS
def test_a_worker_whose_watcher_reads_the_whole_table_waits_for_it_not_reads_it_again(
        racers: tuple[Balancer, Balancer, WholeReads, SubscriberHold]) -> None:
    """The second balancer writes the whole table; the first one's watchers read it
    whole (held here at Redis's door for `FOLLOW_WAIT` and more: a big table, a
    loaded machine) while the first balancer writes one host. Its worker, told of
    that write, waits for its watcher's load instead of reading the table beside
    it. Bug: it waited `FOLLOW_WAIT` (1 s), then read the whole table too (at
    100,000 hosts, 3-15 s of CPU more on a loaded machine, for nothing)."""
    one, two, _, hold = racers
    table = two.api("GET", "/api/v1/hosts")[1]["hosts"]
    whole: list[float] = []
    loaded = threading.Event()

    def slow_whole_reads(data: bytes) -> None:
        if b"HGETALL" in data and b"balancer:hosts" in data:
            whole.append(time.monotonic())
            loaded.wait(10)  # the read goes on to Redis when the test says
    hold.before = slow_whole_reads
    answers: list[tuple[int, Any]] = []
    try:
        status, theirs = two.api("PUT", "/api/v1/hosts", {"hosts": table})
        assert status == 200, theirs
        wait_for(lambda: len(whole) >= 2, 10, what="the first balancer's watchers reading it")
        writer = threading.Thread(target=lambda: answers.append(
            one.api("PUT", "/api/v1/hosts/h5.test", {**STATIC, "body": "one's"})))
        writer.start()
        wait_for(lambda: one.output().count("it reads the whole table") or len(whole) > 2, 10,
                 what="the worker told of the write")
        time.sleep(FOLLOW_WAIT + 0.3)  # the load lasting that long: the scenario, not a sync
        assert len(whole) == 2, "another whole read beside the watchers'"
    finally:
        loaded.set()
        hold.before = lambda data: None
    writer.join(30)
    assert answers == [(200, {"version": theirs["version"] + 1})], answers
    assert request(one.port, host="h5.test")[2] == b"one's"
    assert len(whole) == 2


def parses(bal: Balancer) -> int:
    """The times the management process parsed the routes file (its debug lines)."""
    pid = management_pid(bal)
    return len(re.findall(rf"balancer\.store\.file\[{pid}\]: \S+: parsing", bal.output()))


@pytest.mark.slow
def test_a_file_rewritten_elsewhere_is_parsed_once_for_the_read_and_the_watcher(
        tmp_path: Path) -> None:
    """Another process rewrites the file; a read arrives while the management
    process's watcher parses it: one parse serves both (each parsed it, about 1 s
    each at 100,000 hosts). A corrupt file is parsed once, however many reads ask,
    and reported, the last good table kept; so is a deleted one."""
    from balancer.stores.file import FileStore

    hosts = {f"h{n}.test": {**STATIC, "body": f"h{n}"} for n in range(10000)}
    bal = Balancer(tmp_path, hosts, args=ONE_WORKER, env={"BALANCER_LOG_LEVEL": "debug"})
    try:
        wait_for(lambda: bal.api("GET", "/api/v1/hosts")[1]["version"] == 1, 30,
                 what="the table")
        other = FileStore(str(bal.routes))
        before = parses(bal)
        version = other.put_host("h0.test", {**STATIC, "body": "again"})
        wait_for(lambda: parses(bal) > before, 10, what="the watcher's parse")
        status, body = bal.api("GET", "/api/v1/hosts")  # while the watcher parses
        assert status == 200 and body["version"] == version
        assert body["hosts"]["h0.test"]["body"] == "again"
        assert parses(bal) == before + 1
        before = parses(bal)
        cut = bal.routes.with_suffix(".cut")  # replaced whole, as a copy would be
        cut.write_text('{"version": 9, "hosts": {"x.test": ')
        os.replace(cut, bal.routes)
        for _ in range(3):
            status, body = bal.api("GET", "/api/v1/hosts")
            assert status == 200 and body["version"] == version
            assert "not valid JSON" in body["store_problem"]
        wait_for(lambda: "not valid JSON" in bal.store_problem(), 10, what="the problem")
        assert parses(bal) == before + 1
        bal.routes.unlink()
        wait_for(lambda: "deleted?" in bal.store_problem(), 10, what="the deleted file")
        status, body = bal.api("GET", "/api/v1/hosts")
        assert status == 200 and body["version"] == version and body["store_problem"]
    finally:
        bal.stop()
