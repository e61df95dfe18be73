"""Installed entry points read from the packages' metadata (`balancer.entry_points`):
what `importlib.metadata` finds, in its order, loaded by name; a value that names
no module is a `LookupError` naming its file."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import zipfile
from pathlib import Path

import pytest

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


def install(root: Path, dist: str, text: str) -> None:
    """A made-up installed project: its metadata directory with `text` as its
    ``entry_points.txt``."""
    (root / dist).mkdir(parents=True)
    (root / dist / "entry_points.txt").write_text(text)


def test_the_first_project_of_a_name_on_the_path_wins_as_importlib_metadata_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read without `importlib.metadata`: the same entry points in the same order,
    on a made-up path (two directories, a project in both under two spellings, an
    egg-info, comments, blank lines, spaces, extras, a section of another group)."""
    first, second = tmp_path / "first", tmp_path / "second"
    install(first, "My_Plugin-1.0.dist-info",
            "# a comment\n\n[demo.group]\n  one = pkg.mod:attr.sub [extra]\n"
            "two=pkg.other\n[other.group]\nx = y:z\n")
    install(first, "older-0.1.egg-info", "[demo.group]\nthree = legacy:run\n")
    install(second, "my.plugin-2.0.dist-info", "[demo.group]\nshadowed = no:never\n")
    install(second, "late-1.0.dist-info", "[demo.group]\nfour = late:go\n")
    (second / "plain-1.0.dist-info").mkdir()  # no entry_points.txt
    monkeypatch.setattr(sys, "path", [str(first), str(tmp_path / "missing"), str(second)])
    groups = ("demo.group", "other.group", "none.group")
    found = look_up(groups)
    # (a directory's projects come in its listing's order; the path's order between them)
    assert set(found["demo.group"][:3]) == {
        Target("one", "pkg.mod", "attr.sub"), Target("two", "pkg.other", ""),
        Target("three", "legacy", "run")}
    assert found["demo.group"][3:] == (Target("four", "late", "go"),)
    assert found["other.group"] == (Target("x", "y", "z"),)
    assert found["none.group"] == ()
    assert found == metadata_answer(groups)


def metadata_answer(groups: tuple[str, ...]) -> dict[str, tuple[Target, ...]]:
    """What `importlib.metadata` finds on the current `sys.path`."""
    importlib.invalidate_caches()
    installed = importlib.metadata.entry_points()
    return {group: tuple(Target(ep.name, ep.module, ep.attr or "")
                         for ep in installed.select(group=group)) for group in groups}


def test_a_value_that_names_no_module_fails_naming_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path, "broken-1.0.dist-info", "[demo.group]\nbad = :attr\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(LookupError, match="broken-1.0.dist-info: bad = ':attr' names no"):
        look_up(["demo.group"])
    assert look_up(["other.group"]) == {"other.group": ()}  # (only the groups looked up)


def test_a_zip_on_the_path_is_read_by_importlib_metadata(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "plugins.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("zipped-1.0.dist-info/entry_points.txt", "[demo.group]\nz = zm:f\n")
        zipped.writestr("zipped-1.0.dist-info/METADATA", "Name: zipped\nVersion: 1.0\n")
    monkeypatch.setattr(sys, "path", [str(archive)])
    assert look_up(["demo.group"]) == {"demo.group": (Target("z", "zm", "f"),)}
