"""`/api/v1/stats` and `/api/v1/info` cost what they show, not the table
(a 100,000-host table made every stats call build and send every host's
counters: 2 s and more, and the worker's control answers timed out): a worker
answers a page, named hosts or its active hosts (`balancer.control`), idle
hosts briefly; the management process merges pages of several workers; info
and readiness ask no host's counters.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from balancer.control import ControlServer
from balancer.stats import Stats, merge_snapshots
from management.cluster import page_end
from management.stats_view import stats_view
from tests.support import Balancer, polls_during, request, wait_for


def scripted_worker(stats: Stats) -> SimpleNamespace:
    """What `ControlServer` reads of a worker, over real counters."""
    return SimpleNamespace(
        stats=stats, loaded=True, draining=False, holder=SimpleNamespace(
            table=SimpleNamespace(version=3)),
        tables=SimpleNamespace(highest=3, store_problem=None),
        store=SimpleNamespace(last_error=lambda: None, is_reachable=lambda: True),
        access_log=SimpleNamespace(dropped_total=0))


def control_for(tmp_path: Path, hosts: int) -> tuple[ControlServer, Stats]:
    stats = Stats()
    for i in range(hosts):
        stats.host(f"app{i:04d}.test").backend("127.0.0.1:9")
    server = ControlServer(str(tmp_path), scripted_worker(stats))
    return server, stats


def test_a_worker_answers_a_page_named_hosts_or_its_active_hosts(tmp_path: Path) -> None:
    server, stats = control_for(tmp_path, 1000)
    try:
        busy = stats.hosts["app0500.test"]
        busy.open_requests += 1  # a request came (noted as ClientConnection.handle does)
        stats.mark("app0500.test", busy)
        busy.finish(200, 1, 2, 0.01)
        page = server.answer('stats {"after": "app0100.test", "limit": 10}')
        assert list(page["stats"]["hosts"]) == [f"app{i:04d}.test" for i in range(101, 111)]
        assert page["more"] is True
        last = server.answer('stats {"after": "app0995.test", "limit": 10}')
        assert len(last["stats"]["hosts"]) == 4 and last["more"] is False
        # idle hosts are brief: their backends and states only
        assert page["stats"]["hosts"]["app0101.test"] == {"backends": {"127.0.0.1:9": {}}}
        named = server.answer('stats {"hosts": ["app0500.test", "nobody.test"]}')
        assert list(named["stats"]["hosts"]) == ["app0500.test"]
        assert named["stats"]["hosts"]["app0500.test"]["completed_requests"] == 1
        active = server.answer('stats {"active": true, "hosts": ["app0007.test"]}')
        assert sorted(active["stats"]["hosts"]) == ["app0007.test", "app0500.test"]
        info = server.answer('stats {"hosts": [], "totals": true}')
        assert info["stats"]["hosts"] == {}
        assert info["totals"] == {"open_requests": 0, "completed_requests": 1}
        for bad in ('stats {"limit": 0}', 'stats {"hosts": "x"}', "stats [1]", "stats {"):
            assert "error" in server.answer(bad), bad
        assert server.answer("version")["loaded"] is True
    finally:
        server.close()


def test_a_big_answer_lets_the_workers_loop_run_between_slices(tmp_path: Path) -> None:
    """The active hosts of a scrape are snapshotted and encoded `SLICE` at a
    time, the worker's loop running in between (a greenlet counting its turns
    runs at least once per slice), and the answer is the same."""
    import gevent
    import gevent.socket

    from balancer.control import SLICE

    server, stats = control_for(tmp_path, 5000)
    for key, host in stats.hosts.items():
        host.open_requests += 1
        stats.mark(key, host)
        host.finish(200, 1, 2, 0.01)
    turns = 0

    def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            gevent.sleep(0)

    ours, theirs = gevent.socket.socketpair()
    ours.settimeout(30)
    answering = gevent.spawn(server.handle, theirs, None)
    counter = gevent.spawn(count_turns)
    try:
        ours.sendall(b'stats {"active": true}\n')
        data = b""
        while chunk := ours.recv(65536):
            data += chunk
        answering.join(timeout=30)
        reply = json.loads(data)
        assert len(reply["stats"]["hosts"]) == 5000
        assert reply["stats"]["hosts"]["app0042.test"]["completed_requests"] == 1
        assert turns >= 2 * (5000 // SLICE - 1)  # built, then encoded, in slices
    finally:
        counter.kill()
        ours.close()
        server.close()


def test_a_big_answer_lets_sockets_and_timers_run_between_slices(tmp_path: Path) -> None:
    """Not only ready greenlets: between two slices the worker's loop polls, so a
    request that arrived and a timer that is due are served before the answer's
    end (``gevent.sleep(0)`` ran up to 50 slices without polling)."""
    server, _ = control_for(tmp_path, 5000)
    try:
        polls_during(lambda: server.answer('stats {"limit": 5000}'))
    finally:
        server.close()


def test_the_sorted_order_follows_hosts_that_come_and_go(tmp_path: Path) -> None:
    server, stats = control_for(tmp_path, 5)
    try:
        assert server.answer('stats {"limit": 2}')["stats"]["hosts"].keys() == \
            {"app0000.test", "app0001.test"}
        stats.host("a.test")
        stats.forget_hosts({"app0000.test"})
        assert list(server.answer('stats {"limit": 2}')["stats"]["hosts"]) == \
            ["a.test", "app0001.test"]
    finally:
        server.close()


def test_brief_and_full_snapshots_merge_to_the_shape_of_a_busy_host() -> None:
    busy, idle = Stats(), Stats()
    busy.host("a.test").backend("127.0.0.1:9").failures = 2
    busy.hosts["a.test"].open_requests += 1
    busy.hosts["a.test"].finish(502, 1, 2, 0.01)
    idle.host("a.test").backend("127.0.0.1:9")
    brief = json.loads(json.dumps(idle.snapshot(["a.test"])))
    full = json.loads(json.dumps(busy.snapshot(["a.test"])))
    for parts in ([brief, full], [full, brief]):
        view = stats_view(merge_snapshots(json.loads(json.dumps(parts)), in_place=True))
        host = view["hosts"]["a.test"]
        assert host["completed_requests"] == 1 and host["responses"]["5xx"] == 1
        assert host["backends"]["127.0.0.1:9"]["failures"] == 2
    alone = stats_view(brief)["hosts"]["a.test"]
    assert alone["completed_requests"] == 0
    assert alone["backends"]["127.0.0.1:9"]["outcomes"] == {
        "success": 0, "connect_error": 0, "tls_error": 0, "timeout": 0, "error": 0}


def test_pages_of_workers_serving_different_tables_are_cut_to_the_limit() -> None:
    merged = {"hosts": {"a": {}, "b": {}, "c": {}}}  # worker 1 had a, b; worker 2 b, c
    assert page_end(merged, [{"more": False}, {"more": True}], 2) == "b"
    assert list(merged["hosts"]) == ["a", "b"]
    merged = {"hosts": {"a": {}, "b": {}}}
    assert page_end(merged, [{"more": True}], 2) == "b"
    assert page_end(merged, [{"more": False}], 2) is None
    assert page_end({"hosts": {}}, [], 2) is None


def test_pages_through_a_cluster_of_two_workers(tmp_path: Path) -> None:
    hosts = {f"h{i:03d}.test": {"action": "empty", "status": 204} for i in range(250)}
    bal = Balancer(tmp_path, hosts, args=["--workers", "2"])
    try:
        wait_for(lambda: len(bal.api("GET", "/api/v1/info")[1].get("processes", [])) == 2,
                 what="two workers")
        for i in range(0, 250, 50):
            assert request(bal.port, host=f"h{i:03d}.test")[0] == 204
        seen: list[str] = []
        after = ""
        for _ in range(10):  # 250 hosts and "(unknown)", 100 a page
            status, page = bal.api("GET", f"/api/v1/stats?limit=100&after={after}")
            assert status == 200 and len(page["hosts"]) <= 100
            seen += list(page["hosts"])
            if page["next"] is None:
                break
            after = page["next"]
        assert len(seen) == len(set(seen)) and set(hosts) <= set(seen)
        done = {k: bal.host_stats(k)["completed_requests"] for k in ("h000.test", "h050.test")}
        assert done == {"h000.test": 1, "h050.test": 1}
        assert bal.api("GET", "/api/v1/stats?host=h100.test")[1]["hosts"]["h100.test"][
            "completed_requests"] == 1

        def completed() -> int:
            return sum(p["completed_requests"] for p in bal.api("GET", "/api/v1/info")[1][
                "processes"])
        wait_for(lambda: completed() == 5, what="info's totals (a second old at most)")
        assert bal.api("GET", "/readyz")[0] == 200
    finally:
        bal.stop()
