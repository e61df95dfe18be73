"""Which of balancer's modules run compiled (mypyc, see setup.py), and which are stale.

An editable install (``pip install -e .``) builds the compiled modules next to
their sources, and Python imports the extension before the ``.py``: after an
edit, the old compiled code keeps running until the next install. `stale`
names those modules, so that the test suite and ``balancer serve`` can say so
instead of testing or serving code that is not the source. Only a source
checkout (setup.py beside the package) is checked: an installed wheel's file
times are those of its unpacking.
"""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
GROUP = "balancer_native__mypyc"  # setup.py's mypyc group: the code of every compiled module


def _extensions() -> list[tuple[str, Path, Path]]:
    """(module name, extension file, source file) of every compiled module, from one
    walk of the package (one `rglob` per suffix, into `__pycache__` too, took 4-5 ms
    of every start: `balancer serve` says which modules run compiled)."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    found = []
    for directory, subdirectories, files in os.walk(PACKAGE):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        for name in files:
            suffix = next((s for s in suffixes if name.endswith(s)), None)
            source = Path(directory, name[: -len(suffix)] + ".py") if suffix else None
            if source is not None and source.exists():
                parts = source.relative_to(PACKAGE.parent).with_suffix("").parts
                found.append((".".join(parts), Path(directory, name), source))
    return sorted(found)


def compiled() -> list[str]:
    """The modules that have a compiled extension (empty: all interpreted)."""
    return [name for name, _, _ in _extensions()]


def stale() -> list[str]:
    """Compiled modules whose source changed after they were built (source checkouts)."""
    return _stale(_extensions())


def _stale(found: list[tuple[str, Path, Path]]) -> list[str]:
    if not (PACKAGE.parent / "setup.py").exists():
        return []
    built = _group_built()
    return [name for name, ext, source in found
            if source.stat().st_mtime > max(ext.stat().st_mtime, built)]


def _group_built() -> float:
    """When the group library was last built (0 without one). A module's own
    extension is only a shim that loads its code from the group library, and a
    build leaves a shim that did not change as it was, with its old time (bug:
    every module rebuilt in place was called stale while its code was new)."""
    return max((lib.stat().st_mtime for lib in PACKAGE.parent.glob(f"{GROUP}*")), default=0.0)


def describe() -> str:
    """One line for the start-up log."""
    return report()[1]


def report() -> tuple[bool, str]:
    """Whether any compiled module is stale, and `describe`'s line, from one look
    at the package's files (each look walks the package for every suffix)."""
    found = _extensions()
    if not found:
        return False, "data plane interpreted (installed with BALANCER_PURE=1 or without mypyc)"
    old = _stale(found)
    if old:
        return True, (f"data plane compiled, but STALE: {', '.join(old)} changed after the "
                      f"build; run `pip install -e .` again")
    return False, f"data plane compiled with mypyc ({len(found)} modules)"
