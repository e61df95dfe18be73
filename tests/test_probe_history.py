"""Probe of the traffic history (SPEC §11) past its host cap: more hosts have
seen traffic than it keeps (`MAX_HOSTS`, 1,000; 5 here), and the busy one
sorts last.

Found and fixed: the history kept the first hosts in alphabetical order, and
summed its balancer-wide ``total`` over those only. Past 1,000 hosts with
traffic the dashboard's main chart showed a part of the traffic as the whole
(requests/s, 5xx rate, latency), and a busy host named late in the alphabet
had no history at all while hosts that had one request each did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import Balancer, constants_prefix, request, wait_for

KEPT = 5  # management.history.MAX_HOSTS in this test
QUIET = [f"a{i}.test" for i in range(KEPT + 3)]  # one request each
BUSY = "zz.test"  # sorts after every quiet host
BUSY_REQUESTS = 40


def test_past_the_cap_the_busiest_hosts_are_kept(tmp_path: Path) -> None:
    hosts = {name: {"action": "empty", "status": 204} for name in [*QUIET, BUSY]}
    bal = Balancer(tmp_path, hosts, prefix=constants_prefix(
        {"management.history.INTERVAL": 1.0, "management.history.MAX_HOSTS": KEPT}))
    try:
        for name in QUIET:
            assert request(bal.port, host=name)[0] == 204
        wait_for(lambda: bal.api("GET", "/api/v1/history")[1]["times"], timeout=20,
                 what="a first history sample")

        def busy_rates() -> dict[str, Any] | None:
            """The history once it shows a rate of `BUSY` (a host first kept has
            none: its counters of the sample before are unknown), sending it
            `BUSY_REQUESTS` more requests otherwise."""
            for _ in range(BUSY_REQUESTS):
                assert request(bal.port, host=BUSY)[0] == 204
            view = bal.api("GET", "/api/v1/history?since=600")[1]
            return view if any(view["hosts"].get(BUSY, {}).get("rps", [])) else None

        view = wait_for(busy_rates, timeout=20, what=f"{BUSY}'s requests in the history")
        assert len(view["hosts"]) == KEPT and view["hosts_left_out"] == len(QUIET) + 1 - KEPT
        for point, busy in enumerate(view["hosts"][BUSY]["rps"]):
            assert (view["total"]["rps"][point] or 0) >= (busy or 0)
    finally:
        bal.stop()


def test_the_total_counts_the_hosts_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from balancer.stats import Stats
    from management import history as module

    monkeypatch.setattr(module, "MAX_HOSTS", 2)
    stats = Stats()
    history = module.History()
    for name in ("a.test", "b.test", "c.test"):
        stats.host(name).finish(200, 0, 10, 0.02)
    history.sample(stats.snapshot(), 1000.0)
    for name, count in (("a.test", 1), ("b.test", 1), ("c.test", 10)):
        for _ in range(count):
            stats.host(name).open_requests += 1
            stats.host(name).finish(503 if name == "b.test" else 200, 0, 10, 0.02)
    history.sample(stats.snapshot(), 1005.0)
    view = history.view(3600, 1005.0)
    assert sorted(view["hosts"]) == ["a.test", "c.test"] and view["hosts_left_out"] == 1
    assert view["total"]["rps"] == [None, pytest.approx(12 / 5)]
    assert view["total"]["error_rate"] == [None, pytest.approx(1 / 12, abs=1e-4)]


def test_hosts_as_busy_as_each_other_at_the_cap_keep_their_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hosts with the same traffic, one place left: each overtakes the other
    by turns. Bug: the one ahead at each sample was kept and the other's ring
    dropped, so neither ever showed a rate (every point null); a host kept
    now stays until another completed a quarter more requests than it."""
    from balancer.stats import Stats
    from management import history as module

    monkeypatch.setattr(module, "MAX_HOSTS", 1)
    stats = Stats()
    history = module.History()
    for sample in range(8):
        name = ("b.test", "a.test")[sample % 2]  # b first: a wins a tie by name
        for _ in range(10):
            stats.host(name).open_requests += 1
            stats.host(name).finish(200, 0, 10, 0.02)
        history.sample(stats.snapshot(), 1000.0 + 5 * sample)
    view = history.view(3600, 1035.0)
    (kept, series), = view["hosts"].items()
    assert view["hosts_left_out"] == 1
    assert series["rps"][0] is None and series["rps"][-2:] in ([0.0, 2.0], [2.0, 0.0]), series
