"""The deploy tests' backends and balancer, shared as a pytest plugin (registered
by `tests.conftest`'s ``pytest_plugins``): `a` (the host's backend before a
deploy), `b` (a new one) and `lb` (a balancer routing `HOST` to `a`). A test
module that needs other ones defines its own, which wins over these.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Backend, Balancer

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
def lb(tmp_path: Path, a: Backend) -> Iterator[Balancer]:
    balancer = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [a.address]}})
    yield balancer
    balancer.stop()
