"""Test aid (tests/support.py `constants_prefix`): with this directory on
PYTHONPATH, ``SET_CONSTANTS="package.module.NAME=SECONDS;..."`` replaces each
named module-level number as soon as its module has run, in this process and
in every process it forks. A test that would otherwise wait out a real timer
(the history's 5 s samples, the ACME client's 30 s read timeout) runs the same
code on a shorter clock. Only interpreted modules: a compiled one reads its
constants natively. A name the module lacks fails its import (a renamed
constant must not leave a test waiting for the real timer unnoticed).

``SLOW_FORKED_CHILD=SECONDS``: every child this process (and its children)
forks takes that long to start running its own code, as on a loaded machine
(the window between a fork and the child's first line made wide)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any


def _wanted() -> dict[str, dict[str, float]]:
    """{module: {NAME: value}} from SET_CONSTANTS."""
    wanted: dict[str, dict[str, float]] = {}
    for item in filter(None, os.environ.get("SET_CONSTANTS", "").split(";")):
        target, value = item.split("=")
        module, name = target.rsplit(".", 1)
        wanted.setdefault(module, {})[name] = float(value)
    return wanted


class _SetAfterRun(importlib.abc.MetaPathFinder):
    def __init__(self, wanted: dict[str, dict[str, float]]) -> None:
        self.wanted = wanted

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> Any:
        values = self.wanted.get(fullname)
        if values is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            for name, value in values.items():
                if not hasattr(module, name):
                    raise AttributeError(f"SET_CONSTANTS: {fullname} has no {name}")
                setattr(module, name, value)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("SET_CONSTANTS"):
    sys.meta_path.insert(0, _SetAfterRun(_wanted()))

if os.environ.get("SLOW_FORKED_CHILD"):
    _slow = float(os.environ["SLOW_FORKED_CHILD"])
    os.register_at_fork(after_in_child=lambda: time.sleep(_slow))
