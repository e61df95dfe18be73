"""What the log tells an operator at the default level, through a real balancer:
a backend going down and up (with the reason), and 502/504 summed up once a
second per host, never a line per request."""

from __future__ import annotations

import re
import time

from balancer.errors import ConnectError
from balancer.failures import MAX_LINES, FailureReport
from balancer.stats import Stats
from tests.support import (
    Backend,
    Balancer,
    dead_address,
    in_threads,
    request,
    revive_port,
    wait_for,
)

HOST = "app.test"
SUMMARY = re.compile(r"balancer\.failures\[\d+\]: (\S+): (\d+) requests? answered 502/504 in "
                     r"[\d.]+ s: (.*)$", re.M)


def hammer(port: int, host: str, seconds: float, clients: int = 8) -> list[int]:
    """Statuses of requests sent back to back by `clients` threads for `seconds`."""
    until = time.monotonic() + seconds

    def client() -> list[int]:
        got = []
        while time.monotonic() < until:
            got.append(request(port, host=host)[0])
        return got

    return [status for future in in_threads(clients, client) for status in future.result(30)]


def test_a_dead_backend_under_load_logs_a_summary_per_second(tmp_path):
    dead = dead_address()
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [dead], "retries": 0}},
                   env={"BALANCER_TIMEOUTS_FAIL_TIMEOUT": "60"})
    try:
        started = time.monotonic()
        statuses = hammer(bal.port, HOST, seconds=2.5)
        elapsed = time.monotonic() - started
        assert statuses and set(statuses) == {502}
        wait_for(lambda: sum(int(n) for _, n, _ in SUMMARY.findall(bal.output()))
                 == len(statuses), timeout=5, what="every 502 in a summary")
        log = bal.output()
        lines = SUMMARY.findall(log)
        assert len(statuses) > 5 * len(lines), "a summary per second, not a line per request"
        assert len(lines) <= elapsed + 2
        assert all(host == HOST and "connect failed" in causes and "Connection refused" in causes
                   for host, _, causes in lines), lines
        [down] = re.findall(rf"backend {re.escape(dead)} is down: .*$", log, re.M)
        assert "3 failures in a row" in down and "Connection refused" in down, down
        assert len(log.splitlines()) < 40, log
    finally:
        bal.stop()


def test_a_backend_coming_back_is_logged_up_again(tmp_path):
    dead = dead_address()
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [dead]}},
                   env={"BALANCER_TIMEOUTS_FAIL_TIMEOUT": "0.5"})
    revived = None
    try:
        for _ in range(3):
            assert request(bal.port, host=HOST)[0] == 502
        wait_for(lambda: f"backend {dead} is down" in bal.output(), what="the down line")
        revived = Backend("revived", port=revive_port(dead))
        # fail_timeout (0.5 s) and one request: 10 s leaves a loaded machine room
        wait_for(lambda: request(bal.port, host=HOST)[0] == 200, timeout=10,
                 what="the backend to answer again")
        wait_for(lambda: re.search(rf"INFO balancer.health\[\d+\]: backend {re.escape(dead)} "
                                   r"is up again: a request succeeded after [\d.]+ s down",
                                   bal.output()), what="the up line")
    finally:
        bal.stop()
        if revived is not None:
            revived.stop()


def test_active_checks_log_the_reason_of_a_flip(tmp_path):
    dead = dead_address()
    rule = {"action": "proxy", "backends": [dead],
            "health": {"path": "/healthz", "interval": 0.1, "timeout": 0.5, "fall": 2}}
    bal = Balancer(tmp_path, {HOST: rule})
    try:
        wait_for(lambda: re.search(rf"backend {re.escape(dead)} is down: 2 health checks of "
                                   r"/healthz failed, the last: connect: Connection refused",
                                   bal.output()), what="the active check's down line")
    finally:
        bal.stop()


def test_spin_timeouts_are_summed_up_as_504(tmp_path):
    bal = Balancer(tmp_path, {HOST: {"action": "spin", "timeout": 0.2}})
    try:
        assert {request(bal.port, host=HOST)[0] for _ in range(3)} == {504}
        # a summary a second: the three may be in two (a loaded run's 0.2 s holds
        # spanned a second's end), so the wait is for all three, not for a line
        found = wait_for(lambda: sum(int(n) for _, n, _ in SUMMARY.findall(bal.output())) == 3
                         and SUMMARY.findall(bal.output()), what="every 504 in a summary")
        assert all("held until its timeout" in causes for _, _, causes in found)
    finally:
        bal.stop()


def test_the_report_formats_only_hosts_that_failed_and_starts_again():
    stats = Stats()
    quiet, busy = stats.host("quiet.test"), stats.host("busy.test")
    quiet.finish(200, 1, 1, 0.01)
    for _ in range(3):
        stats.note_failure("busy.test", busy, "connect failed",
                           ConnectError("127.0.0.1:1: Connection refused"))
    stats.note_failure("busy.test", busy, "backend timeout", "slow")
    report = FailureReport(stats)
    [line] = report.report()
    assert line.startswith("busy.test: 4 requests answered 502/504 in ")
    assert line.endswith("3 connect failed, 1 backend timeout (last: slow)")
    assert report.report() == [] and busy.causes == {}


def test_a_report_names_the_worst_hosts_and_counts_the_rest():
    stats = Stats()
    for i in range(MAX_LINES + 5):
        key = f"h{i}.test"
        for _ in range(i + 1):
            stats.note_failure(key, stats.host(key), "connect failed", "refused")
    lines = FailureReport(stats).report()
    assert len(lines) == MAX_LINES + 1
    assert lines[0].startswith(f"h{MAX_LINES + 4}.test: {MAX_LINES + 5} requests")
    assert lines[-1].startswith("5 more hosts: 15 requests answered 502/504 in ")
