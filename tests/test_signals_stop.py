"""Signals as operators send them, through a real balancer: a second SIGTERM or
SIGINT (Ctrl-C twice) and SIGQUIT during a graceful stop, a signal sent straight
to a worker, and the whole process tree signalled at once (`pkill`)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time
from typing import Any

import pytest

from tests.support import Balancer, request, wait_for
from tests.test_process import children_of, is_gone, wait_workers

HOST = "app.test"
SLOW = 20  # seconds a slow request takes: far past every wait below


def routes(backend: Any) -> dict[str, Any]:
    return {HOST: {"action": "proxy", "backends": [backend.address]}}


def slow_requests(bal: Balancer, count: int, seconds: float = SLOW) -> tuple[list[Any],
                                                                             list[threading.Thread]]:
    """`count` slow requests in flight (waited for); their outcomes land in the list."""
    results: list[Any] = []

    def slow() -> None:
        try:
            results.append(request(bal.port, path=f"/slow?s={seconds}", host=HOST,
                                   timeout=seconds + 15)[0])
        except (OSError, http.client.HTTPException) as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=slow) for _ in range(count)]
    for thread in threads:
        thread.start()
    wait_for(lambda: bal.host_stats(HOST).get("open_requests") == count,
             what=f"{count} requests in flight")
    return results, threads


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM),
                                           (signal.SIGINT, signal.SIGINT),
                                           (signal.SIGTERM, signal.SIGQUIT)])
def test_a_second_stop_signal_cuts_a_graceful_stop_short_and_says_what_it_cut(
        tmp_path, backend, first, second):
    """Ctrl-C pressed twice, or SIGTERM then SIGQUIT: the first drains (systemd's one
    SIGTERM still waits for the requests), the second stops at once, and one line says
    what it cut. Bug: a second SIGTERM/SIGINT did nothing (the stop still waited up to
    `timeouts.graceful`), and SIGQUIT cut the requests without a word."""
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "2"],
                   env={"BALANCER_TIMEOUTS_GRACEFUL": "60"})
    try:
        pids = wait_workers(bal, 2)
        results, threads = slow_requests(bal, 3)
        bal.proc.send_signal(first)
        wait_for(lambda: "stopping gracefully" in bal.output(), what="the graceful stop")
        assert bal.proc.poll() is None and results == [], "the first signal drains"
        started = time.monotonic()
        bal.proc.send_signal(second)
        assert bal.proc.wait(15) == 0
        assert time.monotonic() - started < 10  # (the drain had 60 s, its requests 20)
        for thread in threads:
            thread.join(10)
        assert len(results) == 3 and 200 not in results, results
        assert all(map(is_gone, pids))
        name = signal.Signals(second).name
        [line] = [x for x in bal.output().splitlines() if "cut short" in x]
        assert re.search(rf"WARNING balancer\[\d+\]: {name} during the graceful stop: cut "
                         r"short after \d+\.\d s \(of up to 60 s\); 3 connection\(s\) cut in "
                         r"[12] worker\(s\) still draining$", line), line  # (1: one idle)
        assert "Traceback" not in bal.output()
    finally:
        bal.stop(signal.SIGKILL)


def probe_gap(port: int, seconds: float) -> float:
    """Requests one after another on new connections for `seconds`; the longest
    one took (each must be answered 200)."""
    longest, deadline = 0.0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.monotonic()
        status = request(port, host=HOST, timeout=SLOW / 2)[0]
        assert status == 200
        longest = max(longest, time.monotonic() - began)
    return longest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_worker_signalled_directly_is_replaced_while_it_drains(tmp_path, backend, sig):
    """`kill PID` of a worker (a PID from `ps`, `pkill` by name): it drains, and the
    arbiter starts its replacement at once, so new connections on its socket are
    served meanwhile. Bug: the replacement started only once the worker had exited:
    new connections waited for the drain (1.4-1.9 s; up to `timeouts.graceful` with
    a slow request in flight)."""
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "1"],
                   env={"BALANCER_TIMEOUTS_GRACEFUL": "60"})
    try:
        [old] = wait_workers(bal, 1)
        results, threads = slow_requests(bal, 1)
        os.kill(old, sig)
        longest = probe_gap(bal.port, 3.0)
        assert results == [] and not is_gone(old), "the old worker still drains"
        assert longest < SLOW / 2  # (answered while the slow request is in flight)
        print(f"longest wait after signalling the worker: {longest:.3f} s")
        [new] = wait_workers(bal, 1, replacing={old})
        assert f"worker {old} drains on its own (a signal sent to it, not to the " \
               f"arbiter); starting its replacement now" in bal.output()
        threads[0].join(SLOW + 15)
        assert results == [200]
        wait_for(lambda: is_gone(old), what="the old worker to exit")
        assert f"worker {old} exited with code 0" in bal.output()
        assert "unexpectedly" not in bal.output()
        assert new in children_of(bal.proc.pid)
        assert bal.stop() == 0
    finally:
        bal.stop(signal.SIGKILL)


def test_the_whole_tree_signalled_at_once_stops_gracefully_without_replacements(
        tmp_path, backend):
    """`pkill -TERM -f 'balancer serve'`, or a supervisor that signals every process
    of the group: the arbiter stops gracefully, and the workers draining because of
    the same signal are not replaced (no process is forked during the stop)."""
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "2"])
    try:
        wait_workers(bal, 2)
        results, threads = slow_requests(bal, 2, seconds=2)
        children = set(children_of(bal.proc.pid))
        for pid in sorted([bal.proc.pid, *children]):
            os.kill(pid, signal.SIGTERM)
        assert bal.proc.wait(20) == 0
        for thread in threads:
            thread.join(10)
        assert results == [200, 200]
        assert "drains on its own" not in bal.output()
        assert bal.output().count(" ready (slot") == 3  # the first three only
    finally:
        bal.stop(signal.SIGKILL)
