"""The counters kept for workers that exited stay bounded (`management.kept`):
a deleted host's retired counters are forgotten, a host that exists never
loses them, and a worker is retired by its pid and start, not its pid alone.

A real balancer with 2 workers proxying to a real backend; a hostile operator
(this test) creates hosts, sends them traffic, reloads or kills workers and
deletes the hosts again, round after round, while `/metrics` is scraped.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from balancer.control import worker_identity
from tests.support import Balancer, Series, control_socket, request, wait_for
from tests.test_kept_counters import HOST, scrape, worker_pids

ROUNDS = 2  # a graceful reload, then a kill (the hosts re-created after the first)
CHURN = 20  # hosts created, served and deleted each round (the same names: re-created)
KEPT_HOSTS = {HOST, "(unknown)"}  # what the retired total may name once the churn is deleted
GONE = "gone.test"  # a host deleted while a worker is stopped


class PresentNeverDown:
    """Scrapes `/metrics` and fails at the first counter series of a host in
    `present` (and of a backend not `removed` from its rule) that went down or
    away since the scrape before."""

    def __init__(self, bal: Balancer) -> None:
        self.bal = bal
        self.present: set[str] = {HOST}
        self.removed: set[str] = set()
        self.last = scrape(bal)

    def scrape(self) -> Series:
        now = scrape(self.bal)
        fallen = {key: (value, now.get(key)) for key, value in self.last.items()
                  if dict(key[1]).get("host") in self.present
                  and dict(key[1]).get("backend") not in self.removed
                  and now.get(key, -1.0) < value}
        assert not fallen, f"counter series of hosts present went down or away: {fallen}"
        self.last = now
        return now


def requests_of(series: Series, host: str) -> float:
    return sum(v for (name, labels), v in series.items()
               if name == "balancer_requests_total" and ("host", host) in labels)


def retired_hosts(run_dir: str) -> dict[str, Any]:
    """The hosts of the run directory's retired total."""
    with open(os.path.join(run_dir, "retired-total.json")) as f:
        return dict(json.load(f).get("hosts", {}))


def retire_workers(bal: Balancer, graceful: bool) -> None:
    """Replace the workers: all of them by a reload (SIGHUP: each leaves its own
    counters), or one by SIGKILL (retired from its held counters)."""
    before = set(worker_pids(bal))
    if graceful:
        bal.proc.send_signal(signal.SIGHUP)
    else:
        os.kill(min(before), signal.SIGKILL)
    gone = before if graceful else {min(before)}
    wait_for(lambda: len(set(worker_pids(bal)) - before) == len(gone)
             and not gone & set(worker_pids(bal)), 30, interval=0.1, what="the new workers")


@pytest.mark.slow
def test_an_operator_creating_and_deleting_hosts_all_day_leaves_nothing_growing(
        tmp_path, backend, start_backend):
    """Bug: the retired total kept every host ever counted (and every backend
    ever in a rule), so the management process's memory, the run directory's
    total and the hosts each scrape names to the workers grew for ever; and a
    host deleted and created again showed its old retired counters again. Now a
    deleted host's (a removed backend's) are forgotten, and counters of hosts
    present never go down (across reloads and kills)."""
    rule = {"action": "proxy", "backends": [backend.address]}
    extra = start_backend("b").address  # in HOST's rule during each round, then removed
    both = {"action": "proxy", "backends": [backend.address, extra]}
    bal = Balancer(tmp_path, {HOST: rule}, args=["--workers", "2"])
    try:
        pids = wait_for(lambda: worker_pids(bal) if len(worker_pids(bal)) == 2 else None,
                        20, what="two workers")
        run_dir = os.path.dirname(control_socket(pids[0]))
        watch = PresentNeverDown(bal)
        names = [f"churn{n}.test" for n in range(CHURN)]
        for round_ in range(ROUNDS):
            assert bal.api("PUT", "/api/v1/hosts",
                           {"hosts": {HOST: both, **dict.fromkeys(names, rule)}})[0] == 200
            watch.present |= set(names)
            watch.removed -= {extra}
            for name in [HOST, *names]:  # fresh connections: spread over both workers
                assert request(bal.port, host=name)[0] == 200
            # created again, each counts its own request only (not the earlier rounds')
            wait_for(lambda: all(requests_of(watch.scrape(), n) == 1 for n in names), 15,
                     interval=0.1, what=f"round {round_}: one request of each host counted")
            retire_workers(bal, graceful=round_ % 2 == 0)
            wait_for(lambda sent=round_ + 1: requests_of(watch.scrape(), HOST) == sent
                     and len(worker_pids(bal)) == 2, 20, interval=0.1,
                     what=f"round {round_}: the retired counters in /metrics")
            assert all(requests_of(watch.last, n) == 1 for n in names)
            retired = retired_hosts(run_dir).keys() & set(names)  # retired while they exist
            assert retired == set(names) if round_ % 2 == 0 else retired
            assert bal.api("PUT", "/api/v1/hosts", {"hosts": {HOST: rule}})[0] == 200
            watch.present -= set(names)
            watch.removed |= {extra}
            wait_for(lambda: watch.scrape() and forgotten(retired_hosts(run_dir), extra), 15,
                     interval=0.1, what=f"round {round_}: the deleted hosts' counters forgotten")
        hosts = {dict(labels).get("host") for _, labels in watch.scrape()} - {None}
        assert hosts == {HOST} and requests_of(watch.last, HOST) == ROUNDS
    finally:
        bal.stop()


def test_a_deleted_host_keeps_its_retired_counters_while_a_worker_may_serve_it(
        tmp_path, backend):
    """A worker that does not answer (stopped) may still serve a host the others
    deleted: its retired counters are kept until every worker answers without
    it, so they never go missing from a host that exists (it comes back, its
    counter lower)."""
    rule = {"action": "proxy", "backends": [backend.address]}
    bal = Balancer(tmp_path, {HOST: rule, GONE: rule}, args=["--workers", "2"])
    try:
        pids = wait_for(lambda: worker_pids(bal) if len(worker_pids(bal)) == 2 else None,
                        20, what="two workers")
        run_dir = Path(control_socket(pids[0])).parent
        plant_retired(run_dir, worker_identity(1, 1000.0), GONE, 3)
        wait_for(lambda: requests_of(scrape(bal), GONE) == 3, 10, what="the retired requests")
        os.kill(pids[0], signal.SIGSTOP)
        try:
            wait_for(lambda: [e["pid"] for e in bal.api("GET", "/api/v1/stats")[1]
                              .get("lagging", [])] == [pids[0]], 15, what="the stopped worker")
            version = bal.api("PUT", "/api/v1/hosts", {"hosts": {HOST: rule}})[1]["version"]
            wait_for(lambda: [p["version"] for p in bal.api("GET", "/api/v1/info")[1]
                              ["processes"]] == [version], 10, what="the other at the new table")
            for _ in range(10):
                assert GONE not in {dict(labels).get("host") for _, labels in scrape(bal)}
                assert GONE in retired_hosts(str(run_dir))
        finally:
            os.kill(pids[0], signal.SIGCONT)
        wait_for(lambda: scrape(bal) and GONE not in retired_hosts(str(run_dir)), 15,
                 interval=0.1, what="the deleted host's counters forgotten")
    finally:
        bal.stop()


def forgotten(hosts: dict[str, Any], backend: str) -> bool:
    """Whether the retired `hosts` hold nothing deleted: no host but `KEPT_HOSTS`,
    and not `backend` (removed from HOST's rule)."""
    return hosts.keys() <= KEPT_HOSTS and backend not in hosts.get(HOST, {}).get("backends", {})


def test_a_killed_worker_with_the_pid_of_a_retired_one_is_retired_too(tmp_path, backend):
    """Bug: retirements were recorded by pid alone, so a worker killed with the pid
    of one among the last 1,024 retired was taken for retired already and its
    counters were lost (`/metrics` went down). The earlier worker is planted in
    the retired total as the management process records it (real pid reuse
    cannot be forced): the same pid, another start."""
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}})
    try:
        pid = wait_for(lambda: worker_pids(bal)[0] if worker_pids(bal) else None, 20,
                       what="the worker")
        for _ in range(5):
            assert request(bal.port, host=HOST)[0] == 200
        wait_for(lambda: requests_of(scrape(bal), HOST) == 5, 10, what="5 requests counted")
        plant_retired(Path(control_socket(pid)).parent, worker_identity(pid, 1000.0), HOST, 2)
        wait_for(lambda: requests_of(scrape(bal), HOST) == 5 + 2, 10,
                 what="the earlier worker's counters counted")
        os.kill(pid, signal.SIGKILL)
        last = 0.0

        def replaced() -> bool:
            nonlocal last
            now = requests_of(scrape(bal), HOST)
            assert now >= last, f"requests went down from {last} to {now}"
            last = now
            return bool(worker_pids(bal)) and pid not in worker_pids(bal) and now == 7
        wait_for(replaced, 20, interval=0.1, what="the replacement, the killed worker retired")
        for _ in range(5):
            assert requests_of(scrape(bal), HOST) == 5 + 2
    finally:
        bal.stop()


def plant_retired(run_dir: Path, identity: str, host: str, completed: int) -> None:
    """Record worker `identity` as folded into the retired total with `completed`
    requests of `host`, as the management process does (under the run directory's lock)."""
    import fcntl

    from balancer.stats import Stats
    from management.kept import FOLDED, write_json

    stats = Stats()
    for _ in range(completed):
        stats.host(host).finish(200, 1, 1, 0.001)
    fd = os.open(run_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        total: dict[str, Any] = {**stats.snapshot(), FOLDED: [identity]}
        write_json(str(run_dir / "retired-total.json"), total)
    finally:
        os.close(fd)


def test_forgetting_without_room_in_the_run_directory_loses_nothing(
        tmp_path, monkeypatch, caplog):
    """With the run directory's file system full, forgetting a deleted host
    cannot rewrite the retired total: it raises nothing, says nothing (it is
    tried at every survey), leaves no part written, and forgets once there is room."""
    import errno

    from balancer.stats import Stats
    from management.kept import FOLDED, RetiredCounters, write_json

    stats = Stats()
    for host in (HOST, GONE):
        stats.host(host).finish(200, 1, 1, 0.001)
    write_json(str(tmp_path / "retired-total.json"), {**stats.snapshot(), FOLDED: ["7-1000"]})
    retired = RetiredCounters(str(tmp_path))

    def no_room(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_room)
    for _ in range(3):
        retired.forget({GONE: None})
        assert set((retired.snapshot() or {})["hosts"]) == {HOST, GONE}
    assert not caplog.text and [p.name for p in tmp_path.iterdir()] == ["retired-total.json"]
    monkeypatch.undo()
    retired.forget({GONE: None})
    assert set(retired_hosts(str(tmp_path))) == {HOST} and retired.has_retired("7-1000")
