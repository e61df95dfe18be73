"""Counters never go down while the process tree lives (`management.kept`): a
worker that does not answer counts with its last known counters, and one that
dies without retiring its own is retired from them, once.

A real balancer with 2 workers proxying to a real backend; `/metrics` is
scraped over and over while a worker is stopped (SIGSTOP), continued, killed
while stopped and killed while answering. A stopped worker is always
continued in a `finally`.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from balancer.control import ask
from tests.support import Balancer, Series, control_socket, request, wait_for

HOST = "app.test"
ONLY = "only.test"  # a host only the first worker of `two_busy_workers` served
COUNTERS = ("_total", "_bucket", "_count", "_sum")  # a histogram's series are counters too


@pytest.fixture
def two_busy_workers(tmp_path, backend) -> Iterator[tuple[Balancer, list[int], int]]:
    """A balancer whose 2 workers both answered requests to HOST; their pids (the
    first one's the only worker that served ONLY) and the number of requests to
    HOST (all of them counted in `/metrics`)."""
    rule = {"action": "proxy", "backends": [backend.address]}
    bal = Balancer(tmp_path, {HOST: rule, ONLY: rule}, args=["--workers", "2"])
    try:
        pids = wait_for(lambda: worker_pids(bal) if len(worker_pids(bal)) == 2 else None,
                        20, what="two workers")
        assert request(bal.port, host=ONLY)[0] == 200
        served = wait_for(lambda: [pid for pid in pids if counted(pid, ONLY)], 10,
                          what=f"the worker that served {ONLY}")
        sent = send_until_both_counted(bal)
        yield bal, served + [pid for pid in pids if pid not in served], sent
    finally:
        bal.stop()


def worker_pids(bal: Balancer) -> list[int]:
    """The pids of the workers that answer."""
    return sorted(p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"])


def counted(pid: int, host: str) -> int:
    """The requests worker `pid` completed for `host` (asked on its control socket)."""
    reply = ask(control_socket(pid), "stats " + json.dumps({"hosts": [host]}))
    return reply["stats"]["hosts"].get(host, {}).get("completed_requests", 0) if reply else 0


def send_until_both_counted(bal: Balancer, before: int = 0) -> int:
    """Requests on fresh connections (spread over the workers) until each worker
    counted some; the number sent, once `/metrics` counts every one (and
    `before`)."""
    sent = 0

    def both_counted() -> bool:
        nonlocal sent
        for _ in range(10):
            assert request(bal.port, host=HOST)[0] == 200
            sent += 1
        processes = bal.api("GET", "/api/v1/info")[1]["processes"]
        return len(processes) == 2 and all(p["completed_requests"] for p in processes)

    wait_for(both_counted, 20, interval=0.2, what="requests counted by both workers")
    wait_for(lambda: requests_total(scrape(bal)) == before + sent, 10,
             what="every request counted")
    return sent


def scrape(bal: Balancer) -> Series:
    """`/metrics`' counter series."""
    return {key: value for key, value in bal.metrics().items() if key[0].endswith(COUNTERS)}


def requests_total(series: Series) -> float:
    return sum(v for (name, labels), v in series.items()
               if name == "balancer_requests_total" and ("host", HOST) in labels)


class NeverDown:
    """Scrapes `/metrics` and fails at the first counter series that went down
    or went away since the scrape before."""

    def __init__(self, bal: Balancer) -> None:
        self.bal = bal
        self.last = scrape(bal)
        self.fallen: dict[Any, tuple[float, float | None]] = {}

    def scrape(self) -> Series:
        now = scrape(self.bal)
        self.fallen.update({key: (value, now.get(key)) for key, value in self.last.items()
                            if now.get(key, -1.0) < value})
        assert not self.fallen, f"counter series went down or away: {self.fallen}"
        self.last = now
        return now

    def until(self, done: Any, timeout: float, what: str) -> Series:
        """Scrape (checking each) until `done(series)` holds; its last series."""
        def check() -> Series | None:
            series = self.scrape()
            return series if done(series) else None
        found = wait_for(lambda: self.fallen or check(), timeout, interval=0.05, what=what)
        assert not self.fallen, f"counter series went down or away: {self.fallen}"
        return found


def stats_total(bal: Balancer) -> tuple[int, list[int]]:
    """`/api/v1/stats`' completed requests of HOST and the pids it names lagging."""
    doc = bal.api("GET", "/api/v1/stats")[1]
    return (doc["hosts"][HOST]["completed_requests"],
            [entry["pid"] for entry in doc.get("lagging", [])])


def test_a_stopped_worker_keeps_its_counters_until_it_answers_again(two_busy_workers):
    bal, pids, sent = two_busy_workers
    stopped = pids[0]
    watch = NeverDown(bal)
    os.kill(stopped, signal.SIGSTOP)
    try:
        watch.until(lambda s: stats_total(bal) == (sent, [stopped]), 15,
                    what="/api/v1/stats naming the stopped worker with every request")
        for _ in range(5):  # the stopped worker's last counters stay in the sums
            assert requests_total(watch.scrape()) == sent
    finally:
        os.kill(stopped, signal.SIGCONT)
    watch.until(lambda s: stats_total(bal) == (sent, []), 15,
                what="the continued worker back in the answers")
    more = send_until_both_counted(bal, sent)
    assert requests_total(watch.scrape()) == sent + more  # its own counters again, once


def test_a_worker_killed_while_stopped_is_counted_once(two_busy_workers):
    bal, pids, sent = two_busy_workers
    stopped, other = pids
    watch = NeverDown(bal)
    os.kill(stopped, signal.SIGSTOP)
    try:
        watch.until(lambda s: stats_total(bal)[1] == [stopped], 15,
                    what="the stopped worker named lagging")
    finally:
        os.kill(stopped, signal.SIGKILL)  # a stopped process dies of SIGKILL at once
    replaced = watch.until(lambda s: len(set(worker_pids(bal)) - {stopped, other}) == 1
                           and stats_total(bal)[1] == [], 20, what="its replacement")
    assert requests_total(replaced) == sent == stats_total(bal)[0]  # retired once, never twice
    # a worker killed while answering: retired from its last counters too
    os.kill(other, signal.SIGKILL)
    watch.until(lambda s: other not in worker_pids(bal) and len(worker_pids(bal)) == 2, 20,
                what="the second replacement")
    for _ in range(5):
        assert requests_total(watch.scrape()) == sent
    more = send_until_both_counted(bal, sent)
    assert requests_total(watch.scrape()) == sent + more == stats_total(bal)[0]


def test_two_management_processes_retire_a_dead_worker_once(tmp_path):
    """During a reload the old and the new management process both hold a
    worker's counters; whichever sees its socket go first retires them (or
    folds the file the worker wrote itself), the other only forgets them."""
    from balancer.control import control_path, retired_path, worker_identity
    from balancer.stats import Stats
    from management.kept import HeldCounters, RetiredCounters, write_json

    def held_by_both(pid: int, completed: int) -> tuple[HeldCounters, HeldCounters]:
        stats = Stats()
        for _ in range(completed):
            stats.host(HOST).finish(200, 1, 1, 0.001)
        reply = {"pid": pid, "started": 1000.0, "stats": stats.snapshot()}
        pair = HeldCounters(RetiredCounters(str(tmp_path))), \
            HeldCounters(RetiredCounters(str(tmp_path)))
        for held in pair:
            held.keep(control_path(str(tmp_path), pid), json.dumps(reply).encode(), reply)
        return pair

    def total() -> int:
        snapshot = RetiredCounters(str(tmp_path)).snapshot() or {}
        return snapshot.get("hosts", {}).get(HOST, {}).get("completed_requests", 0)

    old, new = held_by_both(101, 3)  # killed: no file of its own
    old.retire_gone([])
    assert old.retired.snapshot() and total() == 3  # folded by the old one
    new.retire_gone([])
    assert total() == 3 and not new.raw
    old, new = held_by_both(102, 4)  # exited gracefully: wrote its final counters
    final = Stats()
    for _ in range(5):
        final.host(HOST).finish(200, 1, 1, 0.001)
    write_json(retired_path(str(tmp_path), worker_identity(102, 1000.0)), final.snapshot())
    new.retired.snapshot()  # the new one folds the worker's file first
    old.retire_gone([])
    assert total() == 3 + 5 and not old.raw


def test_counters_kept_without_room_in_the_run_directory_still_count(
        tmp_path, monkeypatch, caplog):
    """With the run directory's file system full, retiring a dead worker's held
    counters and folding a worker's own file both fail to write. Bug: the
    OSError came out of every survey (`/metrics` and `/api/v1/stats` failed
    from then on, the dead worker's entry never forgotten); now the counters
    count from memory, one line says so, and they are written once there is
    room, once."""
    import errno

    from balancer.control import control_path, retired_path, worker_identity
    from balancer.stats import Stats
    from management.kept import HeldCounters, RetiredCounters, write_json

    def completed(count: int) -> dict[str, Any]:
        stats = Stats()
        for _ in range(count):
            stats.host(HOST).finish(200, 1, 1, 0.001)
        return stats.snapshot()

    def total(retired: RetiredCounters) -> int:
        snapshot = retired.snapshot() or {}
        return snapshot.get("hosts", {}).get(HOST, {}).get("completed_requests", 0)

    write_json(retired_path(str(tmp_path), worker_identity(201, 1000.0)),
               completed(2))  # retired before the disk filled
    held = HeldCounters(RetiredCounters(str(tmp_path)))
    reply = {"pid": 202, "started": 1000.0, "stats": completed(3)}
    held.keep(control_path(str(tmp_path), 202), json.dumps(reply).encode(), reply)
    real_replace = os.replace

    def no_room(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_room)
    held.retire_gone([])  # killed: its held counters have nowhere to go
    assert not held.raw
    for _ in range(3):
        assert total(held.retired) == 2 + 3
    assert caplog.text.count("kept in memory until there is room") == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    other = HeldCounters(RetiredCounters(str(tmp_path)))  # the other management process
    monkeypatch.setattr(os, "replace", real_replace)
    assert total(held.retired) == 2 + 3  # written and folded, once
    assert total(other.retired) == 2 + 3 and held.retired.has_retired(worker_identity(202, 1000.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retired-total.json"]


def test_kept_counters_of_many_hosts_are_asked_in_slices(tmp_path):
    """A survey of the active hosts names the hosts of the kept counters, so the
    workers report them. Bug: named in one command, 150,000 of them (a balancer
    with that many counted hosts reloaded once) passed the control socket's 4 MiB
    line (so do 25,000 long names): the worker cut the connection, was taken for
    silent at every scrape, and `/metrics` showed no host at all; now they are
    named a slice at a time."""
    from balancer.control import retired_path
    from balancer.stats import Stats

    bal = Balancer(tmp_path, {HOST: {"action": "empty", "status": 204}})
    try:
        pid = wait_for(lambda: worker_pids(bal)[0] if worker_pids(bal) else None, 20,
                       what="the worker")
        for _ in range(3):
            assert request(bal.port, host=HOST)[0] == 204
        retired = Stats()
        for _ in range(2):
            retired.host(HOST).finish(204, 1, 1, 0.001)
        snapshot = retired.snapshot()
        long = "tenant." * 28  # 25,000 names of 220 bytes: 5.5 MB, as 150,000 of 35
        snapshot["hosts"].update({f"{long}{n:06d}.example.com": {"completed_requests": 1}
                                  for n in range(25_000)})
        path = retired_path(os.path.dirname(control_socket(pid)), "4000000-1000000")
        with open(path + ".tmp", "w") as out:
            json.dump(snapshot, out)
        os.replace(path + ".tmp", path)  # a worker that exited, as it leaves its counters
        wait_for(lambda: requests_total(scrape(bal)) == 3 + 2, 15,
                 what="the live and the retired requests of the host in /metrics")
        assert "does not answer its control socket" not in bal.output()
    finally:
        bal.stop()
