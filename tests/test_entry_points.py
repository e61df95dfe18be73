"""Installed entry points looked up in a throwaway child (`balancer.entry_points`):
what they name, loaded by name; a look-up that fails or never answers is a
`LookupError` naming why, never a hang."""

from __future__ import annotations

import importlib.metadata
import os
import time
from pathlib import Path
from typing import Any

import pytest

from balancer import entry_points
from balancer.entry_points import Target, load, look_up
from balancer.serve import MANAGEMENT_GROUP, load_management
from management.process import CHILD


def test_the_groups_installed_entry_points_are_found_and_loaded() -> None:
    group = "gevent.plugins.monkey.will_patch_all"
    found = look_up([MANAGEMENT_GROUP, group, "balancer.no-such-group"])
    assert found[MANAGEMENT_GROUP] == (Target("child", "management.process", "CHILD"),)
    assert found["balancer.no-such-group"] == ()
    expected = {(ep.name, ep.module, ep.attr) for ep in importlib.metadata.entry_points(
        group=group)}
    assert {(t.name, t.module, t.attr) for t in found[group]} == expected
    assert all(load(t) is ep.load() for t, ep in zip(
        found[group], importlib.metadata.entry_points(group=group), strict=True))


def test_a_target_is_loaded_as_an_entry_point_would_be() -> None:
    assert load(Target("x", "os", "path.join")) is os.path.join  # a dotted attribute
    assert load(Target("x", "os.path", "")) is os.path  # the module itself
    with pytest.raises(ImportError):
        load(Target("x", "balancer.no_such_module", "f"))


def test_the_management_process_needs_its_entry_point() -> None:
    assert load_management((Target("child", "management.process", "CHILD"),)) is CHILD
    with pytest.raises(LookupError, match="pip install"):
        load_management((Target("other", "management.process", "CHILD"),))
    with pytest.raises(LookupError, match="not a ManagementChild"):
        load_management((Target("child", "os", "path"),))


def broken(**_: Any) -> Any:
    raise OSError("a damaged installation")


def test_a_failed_look_up_names_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's error travels to the caller (the child inherits the patch)."""
    monkeypatch.setattr(importlib.metadata, "entry_points", broken)
    with pytest.raises(LookupError, match="OSError: a damaged installation"):
        look_up([MANAGEMENT_GROUP])


def test_a_look_up_that_never_answers_is_given_up(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    started = tmp_path / "started"

    def stuck(**_: Any) -> Any:
        started.write_text(str(os.getpid()))
        time.sleep(60)

    monkeypatch.setattr(importlib.metadata, "entry_points", stuck)
    monkeypatch.setattr(entry_points, "TIMEOUT", 1.0)
    # the grace is for a child that answered; this one never does, and the whole
    # margin below is left to the fork, the kill and the reaping under load
    monkeypatch.setattr(entry_points, "EXIT_GRACE", 0.0)
    begun = time.monotonic()
    with pytest.raises(LookupError, match="no answer"):
        look_up([MANAGEMENT_GROUP])
    # TIMEOUT in all, not once to read and again to wait for the exit (bug: the
    # two waits each ran their whole TIMEOUT, so never under 2 * TIMEOUT, however
    # idle the machine)
    assert time.monotonic() - begun < 2 * entry_points.TIMEOUT
    child = int(started.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(child, 0)
