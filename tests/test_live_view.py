"""The live view tells the truth: `/api/v1/stats`, `/metrics` and `balancerctl
stats` through a real balancer, a dead backend, rule changes and a reload."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from balancer.stats import Stats, merge_snapshots, only_known
from management.stats_view import backend_stats
from tests.support import (
    ROOT,
    Backend,
    Balancer,
    ScriptedHealth,
    dead_address,
    request,
    revive_port,
    samples,
    wait_for,
)

HOST = "app.test"
OTHER = "other.test"


def proxy(*addresses: str) -> dict[str, Any]:
    return {"action": "proxy", "backends": list(addresses)}


@pytest.fixture
def backends():
    started: list[Backend] = []

    def start(name: str, port: int = 0) -> Backend:
        started.append(Backend(name, port=port))
        return started[-1]

    yield start
    for backend in started:
        backend.stop()


def backend_up(text: str, host: str, address: str) -> float | None:
    """``balancer_backend_up`` of one backend in /metrics' `text` (None: no series)."""
    return samples(text).get(("balancer_backend_up", (("backend", address), ("host", host))))


def state(bal: Balancer, host: str, address: str) -> str:
    return bal.host_stats(host)["backends"][address]["state"]


def ctl_stats(bal: Balancer) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env.update(PYTHONPATH=str(ROOT), BALANCER_URL=f"http://127.0.0.1:{bal.mport}")
    done = subprocess.run([sys.executable, "-m", "management.ctl", "stats"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_failed_backend_is_down_until_a_request_to_it_succeeds(tmp_path, backends):
    good = backends("good")
    dead = dead_address()
    bal = Balancer(tmp_path, {HOST: proxy(dead, good.address)},
                   env={"BALANCER_TIMEOUTS_FAIL_TIMEOUT": "1"})
    try:
        for _ in range(10):
            assert request(bal.port, host=HOST)[0] == 200
        expired = time.monotonic() + 1.5
        wait_for(lambda: time.monotonic() > expired, timeout=3, what="fail_timeout to pass")
        # no traffic since the mark expired, and nothing ever succeeded: not up
        assert state(bal, HOST, dead) == "down"
        assert backend_up(bal.metrics_text(), HOST, dead) == 0
        assert backend_up(bal.metrics_text(), HOST, good.address) == 1
        [row] = [line for line in ctl_stats(bal).splitlines() if dead in line]
        assert row.split()[2] == "down", row
        backends("revived", port=revive_port(dead))

        def probed_up() -> bool:
            request(bal.port, host=HOST)
            return state(bal, HOST, dead) == "up"
        wait_for(probed_up, timeout=10, what="a probe to reach the revived backend")
        assert backend_up(bal.metrics_text(), HOST, dead) == 1
    finally:
        bal.stop()


def test_removed_backends_and_deleted_hosts_leave_the_next_scrape(tmp_path, backends):
    a, b = backends("a"), backends("b")
    bal = Balancer(tmp_path, {HOST: proxy(a.address, b.address), OTHER: proxy(a.address)})
    try:
        for _ in range(4):
            assert request(bal.port, host=HOST)[0] == 200
            assert request(bal.port, host=OTHER)[0] == 200
        text = bal.metrics_text()
        assert backend_up(text, HOST, b.address) == 1 and backend_up(text, OTHER, a.address) == 1
        bal.write_routes({HOST: proxy(a.address)})
        bal.wait_version(2)
        text = bal.metrics_text()
        assert backend_up(text, HOST, a.address) == 1
        assert f'backend="{b.address}"' not in text
        assert f'host="{OTHER}"' not in text
        stats = bal.api("GET", "/api/v1/stats")[1]
        assert OTHER not in stats["hosts"]
        assert set(stats["hosts"][HOST]["backends"]) == {a.address}
        assert stats["hosts"][HOST]["completed_requests"] == 4  # the host's counters stay
        assert OTHER not in ctl_stats(bal) and b.address not in ctl_stats(bal)
    finally:
        bal.stop()


def test_a_scrape_shows_the_hosts_that_had_traffic_not_the_whole_table(tmp_path, backends):
    """A host's series appear with its first request; idle hosts have none
    (their counters are zeros), except the backends an active check watches."""
    a, dead = backends("a"), dead_address()
    table = {f"idle{n:04d}.test": proxy(a.address) for n in range(2000)}
    table[HOST] = proxy(a.address)
    table[OTHER] = {**proxy(dead), "health": {"path": "/", "interval": 0.2, "timeout": 0.5,
                                              "fall": 1, "rise": 1}}
    bal = Balancer(tmp_path, table)
    try:
        assert request(bal.port, host=HOST)[0] == 200
        text = bal.metrics_text()
        assert f'balancer_requests_total{{code="200",host="{HOST}"}} 1.0' in text
        assert "idle" not in text
        assert backend_up(text, HOST, a.address) == 1
        assert wait_for(lambda: backend_up(bal.metrics_text(), OTHER, dead) == 0)
        assert request(bal.port, host="idle0042.test")[0] == 200
        text = bal.metrics_text()
        assert backend_up(text, "idle0042.test", a.address) == 1
        assert len(re.findall(r'host="idle', text)) == len(re.findall(r'host="idle0042', text))
    finally:
        bal.stop()


def test_retired_workers_counters_never_bring_back_a_deleted_host(tmp_path, backends):
    a, b = backends("a"), backends("b")
    bal = Balancer(tmp_path, {HOST: proxy(a.address, b.address), OTHER: proxy(a.address)},
                   config="[server]\nworkers = 1\n")
    try:
        for _ in range(4):
            assert request(bal.port, host=HOST)[0] == 200
            assert request(bal.port, host=OTHER)[0] == 200
        [old] = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: not os.path.exists(f"/proc/{old}"), timeout=30,
                 what="the old worker to retire")
        wait_for(lambda: bal.host_stats(HOST).get("completed_requests") == 4,
                 what="the retired worker's counters")
        bal.write_routes({HOST: proxy(a.address)})
        bal.wait_version(2)
        stats = bal.api("GET", "/api/v1/stats")[1]
        assert OTHER not in stats["hosts"]
        assert set(stats["hosts"][HOST]["backends"]) == {a.address}
        assert stats["hosts"][HOST]["completed_requests"] == 4  # folded in, not lost
        text = bal.metrics_text()
        assert f'host="{OTHER}"' not in text and f'backend="{b.address}"' not in text
    finally:
        bal.stop()


# merging ------------------------------------------------------------------------------
@pytest.mark.parametrize("states,merged", [
    (("up", "up"), "up"), (("up", "probing"), "probing"), (("probing", "up"), "probing"),
    (("down", "probing"), "down"), (("probing", "down"), "down"), (("up", "down"), "down")])
def test_the_worst_state_of_the_workers_wins(states: tuple[str, str], merged: str) -> None:
    snapshots = []
    for worker_state in states:
        stats = Stats()
        stats.host(HOST).backend("127.0.0.1:1").source = ScriptedHealth(worker_state)
        snapshots.append(stats.snapshot())
    got = merge_snapshots(snapshots)["hosts"][HOST]["backends"]["127.0.0.1:1"]["state"]
    assert got == merged


def test_the_distinct_problems_of_the_workers_are_shown_bounded() -> None:
    """Each distinct problem once, in the order met, the first 3 and a count
    (`/api/v1/stats`); a worker that says none adds none."""
    snapshots = []
    for problem in ("refused", "503", "", "refused", "timed out", "reset"):
        stats = Stats()
        stats.host(HOST).backend("127.0.0.1:1").source = ScriptedHealth("down", problem)
        snapshots.append(stats.snapshot())
    merged = merge_snapshots(snapshots)["hosts"][HOST]["backends"]["127.0.0.1:1"]
    assert backend_stats(merged)["problem"] == "refused | 503 | timed out (and 1 more)"
    one = merge_snapshots(snapshots[:1])["hosts"][HOST]["backends"]["127.0.0.1:1"]
    assert backend_stats(one)["problem"] == "refused"


def test_only_known_keeps_what_live_workers_report() -> None:
    retired, live = Stats(), Stats()
    retired.host(HOST).backend("127.0.0.1:1")
    retired.host(HOST).backend("127.0.0.1:2")
    retired.host(OTHER).finish(200, 1, 1, 0.1)
    live.host(HOST).backend("127.0.0.1:1")
    cut = only_known(retired.snapshot(), live.snapshot())
    assert set(cut["hosts"]) == {HOST}
    assert set(cut["hosts"][HOST]["backends"]) == {"127.0.0.1:1"}
