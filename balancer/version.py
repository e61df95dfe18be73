"""``--version`` of `balancer` and `balancerctl`: the version of the code that runs.

``balancer.__version__`` and the directory it was imported from, as ``pip
--version`` says it: a checkout run with ``PYTHONPATH`` beside an installed
package tells which of the two answers. Bug: it printed the installed package's
version (`importlib.metadata`) whatever code ran, so a deploy script checking
what runs was told the installed one."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import balancer


def running_version() -> str:
    """``VERSION from DIR (python X.Y)``: the running code's version and where it is."""
    where = os.path.dirname(os.path.abspath(balancer.__file__ or "."))
    return f"{balancer.__version__} from {where} (python {sys.version_info[0]}." \
           f"{sys.version_info[1]})"


class VersionAction(argparse.Action):
    """``--version``: print ``PROG VERSION from DIR (python X.Y)`` and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version of the running code, where it is, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> NoReturn:
        print(f"{parser.prog} {running_version()}")
        parser.exit()
