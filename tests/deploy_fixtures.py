"""The deploy tests' backends and balancer, shared as a pytest plugin (registered
by `tests.conftest`'s ``pytest_plugins``): `a` (the host's backend before a
deploy), `b` (a new one) and `lb` (a balancer routing `HOST` to `a`). A test
module that needs other ones defines its own, which wins over these; one whose
tests need no fresh process makes `lb` its `shared_lb` (one balancer started
for the module, each test given it as `lb` starts: ~0.6 CPU-s a start saved),
and the few that do ask for `fresh_lb`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.stores import open_store
from tests.support import Backend, Balancer, request, wait_for

HOST = "app.test"


@pytest.fixture
def a() -> Iterator[Backend]:
    backend = Backend("a")
    yield backend
    backend.stop()


@pytest.fixture
def b() -> Iterator[Backend]:
    backend = Backend("b")
    yield backend
    backend.stop()


@pytest.fixture
def fresh_lb(tmp_path: Path, a: Backend) -> Iterator[Balancer]:
    """A balancer of its own for the test (`lb` where a module shares one)."""
    balancer = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [a.address]}})
    yield balancer
    balancer.stop()


@pytest.fixture
def lb(fresh_lb: Balancer) -> Balancer:
    return fresh_lb


@pytest.fixture(scope="module")
def lb_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """One balancer (file store, no host yet) for a module's tests (`shared_lb`)."""
    balancer = Balancer(tmp_path_factory.mktemp("lb"), {})
    yield balancer
    balancer.stop()


@pytest.fixture
def shared_lb(lb_process: Balancer, a: Backend) -> Balancer:
    """`lb_process` as `lb` starts: no deploy running, none claiming `HOST` (a
    test's last deploy lets it go a moment after its record ends), `HOST` alone,
    routed to this test's `a` alone, and served by it. Deploy records of earlier tests
    stay listed (a test looks its own up by id, or at the running ones)."""
    records = open_store(f"file:{lb_process.routes}").records()

    def free() -> bool:
        listed = lb_process.api("GET", "/api/v1/deploys")[1]["deploys"]
        return HOST not in records.claims() and all(r["state"] != "running" for r in listed)
    wait_for(free, timeout=30, interval=0.05, what="no deploy left running")
    for other in set(lb_process.api("GET", "/api/v1/hosts")[1]["hosts"]) - {HOST}:
        assert lb_process.api("DELETE", f"/api/v1/hosts/{other}")[0] == 200
    rule = {"action": "proxy", "backends": [a.address]}
    status, answer = lb_process.api("PUT", f"/api/v1/hosts/{HOST}", rule)
    assert status == 200, answer

    def served_by_a() -> bool:
        status, _, body = request(lb_process.port, host=HOST)
        return status == 200 and json.loads(body)["backend"] == a.name
    wait_for(served_by_a, timeout=10, interval=0.02, what=f"{HOST} served by this test's a")
    return lb_process
