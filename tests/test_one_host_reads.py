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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer
from tests.support import Backend, Balancer, dead_address, wait_for
from tests.test_table_reads import ONE_WORKER, STATIC, WholeReads, settled

RACE = "race.test"
EDITS = 8  # backend edits per balancer, both at once
MONITOR_CLIENT = re.compile(rb"\[\d+ [0-9.]+:(\d+)\]")

ONE_REDIS = pytest.mark.xdist_group("one_host_reads")  # the tests sharing `racers`


def management_pid(bal: Balancer) -> int:
    found = re.search(r"management (\d+) ready", bal.output())
    assert found is not None, bal.output()
    return int(found.group(1))


def client_ports(pid: int, server_port: int) -> set[int]:
    """The local ports of process `pid`'s TCP connections to `server_port`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == server_port:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def management_reads(reads: WholeReads, balancers: tuple[Balancer, ...],
                     server_port: int) -> list[bytes]:
    """The whole reads the balancers' management processes made so far (a worker
    behind a write reads the table whole: not counted here)."""
    reads.count()
    ports = set().union(*(client_ports(management_pid(b), server_port) for b in balancers))
    return [line for line in reads.lines()
            if (m := MONITOR_CLIENT.search(line)) and int(m.group(1)) in ports]


@pytest.fixture(scope="module")
def racers(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Balancer, Balancer, WholeReads, int]]:
    """Two balancers on one private Redis serving `RACE` (a proxy rule) beside 50
    static hosts, and the Redis's whole reads."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    client = redis.Redis.from_url(server.url)
    hosts = {f"h{n}.test": {**STATIC, "body": f"h{n}"} for n in range(50)}
    hosts[RACE] = {"action": "proxy", "backends": [dead_address()]}
    client.hset("balancer:hosts", mapping={h: json.dumps(r) for h, r in hosts.items()})
    client.set("balancer:version", 1)
    client.close()
    reads = WholeReads(server.port)
    one = Balancer(tmp_path_factory.mktemp("a"), None, store=server.url, args=ONE_WORKER)
    two = Balancer(tmp_path_factory.mktemp("b"), None, store=server.url, args=ONE_WORKER)
    try:
        settled(one, two)
        yield one, two, reads, server.port
    finally:
        reads.close()
        one.stop()
        two.stop()
        server.close()


def addresses(rule: dict[str, Any]) -> set[str]:
    return {b if isinstance(b, str) else b["address"] for b in rule["backends"]}


@ONE_REDIS
def test_backend_edits_racing_on_two_balancers_read_one_host(
        racers: tuple[Balancer, Balancer, WholeReads, int]) -> None:
    """Both balancers add backends to one host at once: every edit lands (none lost
    to the other's), each is read back on its balancer at its version or later, a
    stale ``If-Match`` is 409, and neither management process reads the whole table
    (each edit read it: 1-2 s of CPU at 100,000 hosts on Redis; a mirror behind
    another's write read it again after its own)."""
    one, two, reads, port = racers
    before = management_reads(reads, (one, two), port)
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
    assert management_reads(reads, (one, two), port) == before


@ONE_REDIS
def test_a_deploy_reads_one_host(racers: tuple[Balancer, Balancer, WholeReads, int]) -> None:
    """A deploy's start, switch and finish read the host's rule, not the table."""
    one, two, reads, port = racers
    backend = Backend("new")
    try:
        before = management_reads(reads, (one, two), port)
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
        assert management_reads(reads, (one, two), port) == before
    finally:
        backend.stop()


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
