"""Real balancer processes sharing one real Redis: propagation, outages, metrics, balancerctl."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balancer.stores.redis import RedisStore
from tests.conftest import RedisServer, wait_until
from tests.support import ROOT, Backend, Balancer, request

FAST_RESYNC = {"BALANCER_STORE_RESYNC_INTERVAL": "0.5"}


def proxy_rule(backend: Backend) -> dict:
    return {"action": "proxy", "backends": [backend.address]}


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend("one")
    yield server
    server.stop()


@pytest.fixture
def start_balancer(tmp_path: Path) -> Iterator[Callable[[RedisServer], Balancer]]:
    started: list[Balancer] = []

    def start(redis: RedisServer) -> Balancer:
        directory = tmp_path / f"balancer{len(started)}"
        directory.mkdir()
        balancer = Balancer(directory, args=["--store", redis.url], env=FAST_RESYNC)
        started.append(balancer)
        return balancer
    yield start
    for balancer in started:
        balancer.stop()


def routes_to(balancer: Balancer, host: str, status: int = 200) -> bool:
    try:
        return request(balancer.port, host=host, timeout=5)[0] == status
    except OSError:
        return False


def test_a_rule_put_through_one_balancer_is_routed_by_both(
        redis_factory: Callable[[], RedisServer], start_balancer: Callable, backend: Backend
        ) -> None:
    redis = redis_factory()
    first, second = start_balancer(redis), start_balancer(redis)
    assert request(second.port, host="app.test")[0] == 503  # the no-hosts page, before the write
    status, body = first.api("PUT", "/api/v1/hosts/app.test", proxy_rule(backend))
    assert (status, body) == (200, {"version": 1})
    written = time.monotonic()
    wait_until(lambda: routes_to(second, "app.test"), timeout=2, message="second to route")
    assert time.monotonic() - written < 1.0
    assert routes_to(first, "app.test")
    assert second.api("GET", "/api/v1/hosts")[1]["hosts"] == {"app.test": proxy_rule(backend)}


class Traffic:
    """Requests in a loop from a thread; every non-200 or error is recorded."""

    def __init__(self, balancer: Balancer, host: str) -> None:
        self.balancer = balancer
        self.host = host
        self.ok = 0
        self.failures: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                status = request(self.balancer.port, host=self.host, timeout=5)[0]
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"status {status}")

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(10)


def test_redis_stopped_under_traffic_fails_no_request_and_resyncs_on_restart(
        redis_factory: Callable[[], RedisServer], start_balancer: Callable, backend: Backend
        ) -> None:
    redis = redis_factory()
    balancer = start_balancer(redis)
    assert balancer.api("PUT", "/api/v1/hosts/app.test", proxy_rule(backend))[0] == 200
    wait_until(lambda: routes_to(balancer, "app.test"), message="the rule to be served")
    with Traffic(balancer, "app.test") as traffic:
        wait_until(lambda: traffic.ok > 20, message="traffic to flow")
        redis.stop()
        wait_until(lambda: balancer.api("GET", "/readyz")[0] == 503, message="unready")
        assert balancer.metrics()[("balancer_store_up", ())] == 0
        status, body = balancer.api("PUT", "/api/v1/hosts/other.test", proxy_rule(backend))
        assert (status, body["error"]) == (503, "store_unavailable")
        served_while_down = traffic.ok
        wait_until(lambda: traffic.ok > served_while_down + 20, message="traffic while down")
        redis.start()
        RedisStore(redis.url).put_host("new.test", {"action": "empty", "status": 204})
        wait_until(lambda: routes_to(balancer, "new.test", 204), timeout=10,
                   message="the change made while cut off")
        wait_until(lambda: balancer.api("GET", "/readyz")[0] == 200, message="ready again")
        assert balancer.metrics()[("balancer_store_up", ())] == 1
        ok_after = traffic.ok
        wait_until(lambda: traffic.ok > ok_after + 10, message="traffic after the restart")
    assert traffic.failures == []
    assert traffic.ok > 50


def test_metrics_count_the_traffic_sent(redis_factory: Callable[[], RedisServer],
                                        start_balancer: Callable, backend: Backend) -> None:
    balancer = start_balancer(redis_factory())
    balancer.api("PUT", "/api/v1/hosts/app.test", proxy_rule(backend))
    wait_until(lambda: routes_to(balancer, "app.test"), message="the rule to be served")
    for _ in range(20):
        assert request(balancer.port, host="app.test")[0] == 200
    for _ in range(5):
        assert request(balancer.port, path="/status/404", host="app.test")[0] == 404
    host = (("host", "app.test"),)
    success = ("balancer_backend_requests_total",
               (("backend", backend.address), *host, ("outcome", "success")))
    values = wait_until(lambda: (m := balancer.metrics())[success] >= 26 and m,
                        message="the counters to settle")
    assert values[("balancer_requests_total", (("code", "200"), *host))] == 21
    assert values[("balancer_requests_total", (("code", "404"), *host))] == 5
    assert values[success] == 26
    assert values[("balancer_request_duration_seconds_count", host)] == 26
    assert values[("balancer_bytes_sent_total", host)] > 0
    assert values[("balancer_backend_up", (("backend", backend.address), *host))] == 1
    assert values[("balancer_routing_version", ())] == 1
    assert values[("balancer_store_up", ())] == 1
    stats = balancer.api("GET", "/api/v1/stats/app.test")[1]
    assert stats["completed_requests"] == 26
    assert stats["responses"]["2xx"] == 21 and stats["responses"]["4xx"] == 5


def test_balancerctl_against_a_live_balancer(redis_factory: Callable[[], RedisServer],
                                             start_balancer: Callable, backend: Backend) -> None:
    balancer = start_balancer(redis_factory())
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")},
           "BALANCER_URL": f"http://127.0.0.1:{balancer.mport}", "PYTHONPATH": str(ROOT)}

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "management.ctl", *args], env=env,
                              capture_output=True, text=True, timeout=30)
    assert ctl("set", "app.test", "proxy", "--backend", backend.address).returncode == 0
    wait_until(lambda: routes_to(balancer, "app.test"), message="the rule to be served")
    assert ctl("reload").stdout.strip() == "reloaded: version 1"
    assert "app.test" in ctl("stats", "app.test").stdout
    failed = ctl("add-backend", "app.test", "not-an-address")
    assert failed.returncode == 1
    assert failed.stderr.startswith("balancerctl: 400 invalid_rule")
