"""``--version`` of `balancer` and `balancerctl`: the installed package's version.

Looked up only when the flag is given: `importlib.metadata` (and what it imports)
stays out of every other run, the arbiter's above all (`balancer.entry_points`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

PACKAGE = "balancer"


def installed_version() -> str:
    """The version pip installed ("not installed" for a checkout run from its sources)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "not installed"


class VersionAction(argparse.Action):
    """``--version``: print ``PROG VERSION`` and exit 0, as argparse's own does."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> NoReturn:
        print(f"{parser.prog} {installed_version()}")
        parser.exit()
