"""The suite's own work order under pytest-xdist (tests/conftest.py): a module's
tests that share a module-scoped fixture run as one group on one worker, and
the work is handed out longest first."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import SLOW_WEIGHT, shares_a_fixture, unit, weight


@pytest.fixture(scope="module")
def shared() -> object:
    return object()


@pytest.fixture
def own() -> object:
    return object()


def test_a_test_using_a_module_fixture_runs_in_its_modules_group(request: Any,
                                                                 shared: object) -> None:
    assert shares_a_fixture(request.node)
    if hasattr(request.config, "workerinput"):  # under xdist: grouped
        assert unit(request.node) == "@tests.test_xdist_groups"
        if request.config.getoption("dist") == "loadgroup":  # and xdist saw it
            assert request.node.nodeid.endswith("@tests.test_xdist_groups")
    else:  # one process: the collection is left as it is
        assert request.node.get_closest_marker("xdist_group") is None


def test_a_test_with_only_its_own_fixtures_is_handed_out_alone(request: Any,
                                                              own: object) -> None:
    assert not shares_a_fixture(request.node)
    assert request.node.get_closest_marker("xdist_group") is None
    assert unit(request.node) == request.node.nodeid


@pytest.mark.xdist_group("named")
def test_a_named_group_is_kept(request: Any, shared: object) -> None:
    assert unit(request.node) == "@named"


@pytest.mark.parametrize(("marks", "expected"), [
    ([], 1), ([pytest.mark.slow], SLOW_WEIGHT), ([pytest.mark.slow(60)], 60)])
def test_weights(request: Any, marks: list[Any], expected: int) -> None:
    class Item:
        def get_closest_marker(self, name: str) -> Any:
            return next((m.mark for m in marks if m.mark.name == name), None)
    assert weight(Item()) == expected  # type: ignore[arg-type]
