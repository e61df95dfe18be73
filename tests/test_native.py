"""`balancer.native`: which modules run compiled, and which builds are stale."""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest

from balancer import native

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A source checkout: setup.py beside a package with one compiled module."""
    package = tmp_path / "balancer"
    (package / "actions").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("")
    for name in ("relay", "actions/proxy"):
        (package / f"{name}.py").write_text("")
        (package / f"{name}{SUFFIX}").write_bytes(b"")
    (package / "cli.py").write_text("")  # not compiled
    monkeypatch.setattr(native, "PACKAGE", package)
    return package


def age(path: Path, seconds: float) -> None:
    stamp = path.stat().st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_compiled_modules_are_those_with_an_extension_beside_the_source(tree: Path) -> None:
    assert native.compiled() == ["balancer.actions.proxy", "balancer.relay"]
    assert native.describe() == "data plane compiled with mypyc (2 modules)"


def test_a_source_edited_after_the_build_is_stale(tree: Path) -> None:
    age(tree / f"relay{SUFFIX}", 60)
    assert native.stale() == ["balancer.relay"]
    assert "STALE: balancer.relay" in native.describe()


def test_a_shim_left_as_it_was_by_a_newer_build_of_the_group_is_not_stale(tree: Path) -> None:
    group = tree.parent / f"{native.GROUP}{SUFFIX}"
    group.write_bytes(b"")
    age(tree / f"relay{SUFFIX}", 60)
    assert native.stale() == []
    age(group, 120)  # the group built before the source's edit too
    assert native.stale() == ["balancer.relay"]


def test_an_installed_package_is_never_called_stale(tree: Path) -> None:
    age(tree / f"relay{SUFFIX}", 60)
    (tree.parent / "setup.py").unlink()  # site-packages: no setup.py beside the package
    assert native.stale() == []


def test_no_extension_means_interpreted(tree: Path) -> None:
    for ext in tree.rglob(f"*{SUFFIX}"):
        ext.unlink()
    assert native.compiled() == [] and native.stale() == []
    assert native.describe().startswith("data plane interpreted")
