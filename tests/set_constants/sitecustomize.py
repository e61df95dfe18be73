"""Test aid (tests/support.py `constants_prefix`): with this directory on
PYTHONPATH, ``SET_CONSTANTS="package.module.NAME=SECONDS;..."`` replaces each
named module-level number as soon as its module has run, in this process and
in every process it forks. A test that would otherwise wait out a real timer
(the history's 5 s samples, the ACME client's 30 s read timeout) runs the same
code on a shorter clock. Only interpreted modules: a compiled one reads its
constants natively. A name the module lacks fails its import (a renamed
constant must not leave a test waiting for the real timer unnoticed).

``SLOW_CALLS="package.module.NAME=SECONDS;..."``: each named module-level
function sleeps that long before it runs (replaced as its module has run, the
same way): a window between two steps of a process made wide, to land a
change from outside in it.

``FAIL_CALLS="package.module:Class.method;..."`` with ``FAIL_WHILE=PATH``: each
named function or method raises ``RuntimeError("scripted failure")`` whenever
it is called while the file PATH exists (a bug made to strike, and cured, by
the test: creating and deleting PATH); ``FAIL_RAISES=package.module:Class``
raises that class instead (a store's error, say). One entry may name its own
class and flag: ``package.module:Class.method!package.module:Error@PATH``
(two failures struck and cured apart: a step's bug and a store's refusal).

``COUNT_CALLS="package.module:Class.method;..."`` with ``COUNT_INTO=PATH``: each
call of a named function or method (a scripted failure included) appends a line
with the calling process's pid to PATH: a test waits for a loop's next turns
by counting them (`tests.support.calls`), not by sleeping.

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


def _wanted(variable: str) -> dict[str, dict[str, float]]:
    """{module: {NAME: value}} from the environment's `variable`."""
    wanted: dict[str, dict[str, float]] = {}
    for item in filter(None, os.environ.get(variable, "").split(";")):
        target, value = item.split("=")
        module, name = target.rsplit(".", 1)
        wanted.setdefault(module, {})[name] = float(value)
    return wanted


def _slowed(function: Any, seconds: float) -> Any:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return function(*args, **kwargs)
    return slow


def _failing(function: Any, flag: str, raises: str = "") -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        if os.path.exists(flag):
            raise _failure(raises)("scripted failure")
        return function(*args, **kwargs)
    return fail


def _counted(function: Any, path: str) -> Any:
    def count(*args: Any, **kwargs: Any) -> Any:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())  # (one write: whole lines)
        finally:
            os.close(fd)
        return function(*args, **kwargs)
    return count


def _failure(named: str = "") -> Any:
    """The exception class `named` or ``FAIL_RAISES`` names (``package.module:Class``),
    or RuntimeError."""
    named = named or os.environ.get("FAIL_RAISES", "")
    if not named:
        return RuntimeError
    module, name = named.split(":")
    return getattr(importlib.import_module(module), name)


def _failures(variable: str = "FAIL_CALLS") -> dict[str, list[str]]:
    """{module: [attribute path]} from ``FAIL_CALLS`` (or ``COUNT_CALLS``)."""
    wanted: dict[str, list[str]] = {}
    for item in filter(None, os.environ.get(variable, "").split(";")):
        module, attribute = item.split(":", 1)
        wanted.setdefault(module, []).append(attribute)
    return wanted


class _SetAfterRun(importlib.abc.MetaPathFinder):
    def __init__(self, constants: dict[str, dict[str, float]],
                 slow: dict[str, dict[str, float]], fail: dict[str, list[str]],
                 count: dict[str, list[str]]) -> None:
        self.constants = constants
        self.slow = slow
        self.fail = fail
        self.count = count

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> Any:
        if fullname not in self.constants and fullname not in self.slow \
                and fullname not in self.fail and fullname not in self.count:
            return None
        values = self.constants.get(fullname, {})
        slow = self.slow.get(fullname, {})
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            for name, value in {**values, **slow}.items():
                if not hasattr(module, name):
                    raise AttributeError(f"SET_CONSTANTS: {fullname} has no {name}")
                old = getattr(module, name)
                if isinstance(old, int) and value.is_integer():
                    value = int(value)  # a count stays an int (a slice's bound)
                setattr(module, name, _slowed(old, value) if name in slow else value)
            for entry in self.fail.get(fullname, []):
                entry, _, flag = entry.partition("@")
                attribute, _, raises = entry.partition("!")
                _wrap(module, attribute, lambda f, p, r=raises: _failing(f, p, r),
                      flag or os.environ["FAIL_WHILE"])
            for attribute in self.count.get(fullname, []):
                _wrap(module, attribute, _counted, os.environ["COUNT_INTO"])

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _wrap(module: ModuleType, attribute: str, wrapper: Any, path: str) -> None:
    """Replace `module`'s `attribute` (``Class.method`` or a function) by
    ``wrapper(it, path)``."""
    *owners, name = attribute.split(".")
    owner: Any = module
    for part in owners:
        owner = getattr(owner, part)
    setattr(owner, name, wrapper(getattr(owner, name), path))


if os.environ.get("SET_CONSTANTS") or os.environ.get("SLOW_CALLS") \
        or os.environ.get("FAIL_CALLS") or os.environ.get("COUNT_CALLS"):
    sys.meta_path.insert(0, _SetAfterRun(_wanted("SET_CONSTANTS"), _wanted("SLOW_CALLS"),
                                         _failures(), _failures("COUNT_CALLS")))

if os.environ.get("SLOW_FORKED_CHILD"):
    _slow = float(os.environ["SLOW_FORKED_CHILD"])
    os.register_at_fork(after_in_child=lambda: time.sleep(_slow))
