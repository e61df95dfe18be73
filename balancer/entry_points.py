"""Installed entry points (the management process, gevent's plugins), read
from the installed packages' ``entry_points.txt`` files without
`importlib.metadata`.

`importlib.metadata` and what it imports (email, csv, zipfile, ...: 1.8 MiB
of objects by tracemalloc, and 89 M instructions with its scan, a fifth of
the arbiter's own start-up) serve only this one look-up at start. So the
arbiter reads the files it would read, as it reads them: every directory on
`sys.path` in order, its ``*.dist-info`` and ``*.egg-info`` directories in
the listing's order, the first of each project name (PEP 503, dashes as
underscores) kept, each file's ``[group]`` sections and ``name = value``
lines, ``#`` comments; and loads each `Target` by name (`load`), as
`importlib.metadata.EntryPoint.load` does. A path entry that is not a plain
directory (a zip file, an ``.egg``) is left to `importlib.metadata`, which
reads those too (it is imported then, and stays in the arbiter).

Before, a throwaway child ran `importlib.metadata` and wrote the answer to a
pipe: a fork, an import and an exit at every start (docs/performance.md).

Invariants:
* The same entry points as `importlib.metadata.entry_points().select(group=G)`,
  in the same order (tests/test_entry_points.py compares them on the
  installation that runs the tests, and on made-up ones).
* A value that names no module (``name = :x``) in a group looked up is a
  `LookupError` naming the file; nothing is guessed.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

INFO_SUFFIXES = (".dist-info", ".egg-info")
# `importlib.metadata.EntryPoint.pattern`
VALUE = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")
# what `importlib.metadata` takes for a file that is not there
MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


@dataclass(frozen=True)
class Target:
    """One entry point: ``name = module:attr`` (`attr` dotted, "" for the module)."""

    name: str
    module: str
    attr: str


def look_up(groups: Iterable[str]) -> dict[str, tuple[Target, ...]]:
    """Every installed entry point of each of `groups` (empty when none is)."""
    wanted = tuple(groups)
    paths = [entry or "." for entry in sys.path]
    if not all(os.path.isdir(path) and not path.lower().endswith(".egg")
               for path in paths if os.path.exists(path)):
        return _from_metadata(wanted)
    found: dict[str, list[Target]] = {group: [] for group in wanted}
    for info in _distributions(paths):
        try:
            with open(os.path.join(info, "entry_points.txt"), encoding="utf-8") as f:
                text = f.read()
        except MISSING:
            continue
        except (OSError, ValueError) as exc:
            raise LookupError(f"cannot look up the installed entry points: {info}: "
                              f"{exc}") from None
        for group, name, value in _sections(text):
            if group in found:
                found[group].append(_target(name, value, info))
    return {group: tuple(targets) for group, targets in found.items()}


def load(target: Target) -> Any:
    """The object `target` names, its module imported."""
    module = importlib.import_module(target.module)
    return functools.reduce(getattr, filter(None, target.attr.split(".")), module)


def _distributions(paths: list[str]) -> Iterator[str]:
    """The metadata directory of each installed project, the first found of each
    name (`importlib.metadata`'s `Lookup` and `_unique`)."""
    seen = set()
    for path in paths:
        try:
            children = os.listdir(path)
        except OSError:
            continue
        named: dict[str, list[str]] = {}
        for child in children:
            low = child.lower()
            if low.endswith(INFO_SUFFIXES):
                name = low.rpartition(".")[0].partition("-")[0]
                named.setdefault(_normalize(name), []).append(child)
        for normalized, infos in named.items():
            for child in infos:
                if normalized not in seen:
                    seen.add(normalized)
                    yield os.path.join(path, child)


def _normalize(name: str) -> str:
    """PEP 503 normalization plus dashes as underscores (`importlib.metadata`)."""
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _sections(text: str) -> Iterator[tuple[str, str, str]]:
    """(group, name, value) of each ``name = value`` line under a ``[group]``."""
    group = None
    for line in map(str.strip, text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line.strip("[]")
        elif group is not None:
            name, _, value = line.partition("=")
            yield group, name.strip(), value.strip()


def _target(name: str, value: str, info: str) -> Target:
    match = VALUE.match(value)
    if match is None:
        raise LookupError(f"cannot look up the installed entry points: {info}: "
                          f"{name} = {value!r} names no module")
    return Target(name, match.group("module"), match.group("attr") or "")


def _from_metadata(groups: tuple[str, ...]) -> dict[str, tuple[Target, ...]]:
    """`importlib.metadata`'s answer, for a `sys.path` this module does not read."""
    from importlib.metadata import entry_points

    try:
        installed = entry_points()  # one scan of the packages' metadata, not one a group
        return {group: tuple(Target(ep.name, ep.module, ep.attr or "")
                             for ep in installed.select(group=group)) for group in groups}
    except Exception as exc:  # noqa: BLE001 - the caller fails with it
        raise LookupError(f"cannot look up the installed entry points: "
                          f"{type(exc).__name__}: {exc}") from None
