"""Installed entry points (the management process, gevent's plugins), looked
up in a throwaway child so that the arbiter never imports `importlib.metadata`.

`importlib.metadata` and what it imports (email, csv, ...: 1.8 MiB of
objects by tracemalloc) serve only this one look-up at start. Imported by the
arbiter, they would stay in its memory for its whole life, in pages every
child maps and no child uses (docs/performance.md: the idle tree's
anonymous memory 1.0 MiB less without them). So a forked child scans the
installed packages, writes what each group names to a pipe and exits; the
arbiter loads each `Target` by name (`load`), as
`importlib.metadata.EntryPoint.load` does.

Invariants:
* Only at start, before the arbiter runs a thread: the child forgets the
  arbiter's signal queue (`balancer.signal_queue.forget`), runs nothing but the
  look-up and leaves through `os._exit` (no `atexit`, no buffered output
  written twice). A stop asked for meanwhile ends the wait for it.
* A failed look-up (the child's error, or no answer within `TIMEOUT`) is a
  `LookupError` that names the reason; nothing is guessed.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import select
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from balancer.signal_queue import forget, held, stop_asked
from balancer.startup import flush_std, wait_for_exit

TIMEOUT = 30.0  # seconds the child may take to scan the installed packages
STOP_POLL = 0.1  # seconds between looks at whether a stop was asked for while waiting
EXIT_GRACE = 0.2  # seconds a child that answered may take to exit, past TIMEOUT


@dataclass(frozen=True)
class Target:
    """One entry point: ``name = module:attr`` (`attr` dotted, "" for the module)."""

    name: str
    module: str
    attr: str


def look_up(groups: Iterable[str]) -> dict[str, tuple[Target, ...]]:
    """Every installed entry point of each of `groups` (empty when none is)."""
    wanted = tuple(groups)
    read_fd, write_fd = os.pipe()
    flush_std()
    with held():
        pid = os.fork()
        if pid == 0:
            forget()
            os.close(read_fd)
            _answer(write_fd, wanted)
    os.close(write_fd)
    deadline = time.monotonic() + TIMEOUT
    try:
        data = _read_to_end(read_fd, deadline)
    finally:
        os.close(read_fd)
    # within the same deadline (bug: a child that never answered was waited for
    # twice as long, a minute, before the arbiter gave up), but for a child that
    # answered at its end: it exits as it closes the pipe
    code = wait_for_exit(pid, max(deadline - time.monotonic(), EXIT_GRACE))
    try:
        found = json.loads(data)
    except ValueError:
        found = {"error": f"no answer (exit code {code})"}
    if code != 0 or "error" in found:
        raise LookupError(f"cannot look up the installed entry points: {found.get('error')}")
    return {group: tuple(Target(*entry) for entry in found["groups"][group])
            for group in wanted}


def load(target: Target) -> Any:
    """The object `target` names, its module imported."""
    module = importlib.import_module(target.module)
    return functools.reduce(getattr, filter(None, target.attr.split(".")), module)


def _answer(fd: int, groups: tuple[str, ...]) -> NoReturn:
    """In the child: write the groups' entry points (or the error) as JSON, exit."""
    code = 1
    try:
        try:
            from importlib.metadata import entry_points

            installed = entry_points()  # one scan of the packages' metadata, not one a group
            answer: dict[str, Any] = {"groups": {
                group: [(ep.name, ep.module, ep.attr or "")
                        for ep in installed.select(group=group)]
                for group in groups}}
            code = 0
        except Exception as exc:  # noqa: BLE001 - told to the arbiter, which fails with it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(answer).encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os._exit(code)


def _read_to_end(fd: int, deadline: float) -> bytes:
    """What the pipe carries until the writer closes it, until `deadline`, or until
    a stop is asked for (looked at every `STOP_POLL` s: a signal does not end
    `select`, which is retried. Bug: SIGTERM waited for the child up to 30 s)."""
    chunks = []
    while (left := deadline - time.monotonic()) > 0 and not stop_asked():
        if not select.select([fd], [], [], min(left, STOP_POLL))[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
