"""Run directories left behind by balancers that were killed, found and removed.

A balancer stopped by a signal it cannot catch (`SIGKILL`, the OOM killer) leaves
its run directory in ``$TMPDIR`` (`balancer.serve.make_run_dir`): 2.3 MiB of a
tmpfs, memory, for good. So the arbiter locks a file there (`hold`) on a
descriptor every child inherits: the lock is free only once the arbiter and every
child of it are gone, draining workers included. A starting balancer removes the
directories of its own user whose lock is free (`sweep`); a directory without
the file (made by another version, or being made) is left alone.

Invariants:
* The lock file appears under its name already locked (made under another
  name, locked, then renamed), so a sweep never takes a starting balancer's.
* Only directories named ``balancer-*`` that this user owns are looked at.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat

log = logging.getLogger("balancer")

LOCK = "alive.lock"
PREFIX = "balancer-"


def hold(run_dir: str) -> int:
    """Lock `run_dir`'s `LOCK` for this process and the children it forks; the
    descriptor (kept open for life: the lock goes with the last holder)."""
    making = os.path.join(run_dir, LOCK + ".new")
    fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(making, os.path.join(run_dir, LOCK))
    return fd


def sweep(run_dir: str) -> list[str]:
    """Remove the run directories beside `run_dir` that no process holds; their paths."""
    parent = os.path.dirname(run_dir)
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(PREFIX) and entry.path != run_dir and _left(entry):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        log.info("removed %d run director%s left by balancers that were killed: %s",
                 len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed


def _left(entry: os.DirEntry[str]) -> bool:
    """Whether `entry` is this user's run directory and its lock is free."""
    try:
        if not entry.is_dir(follow_symlinks=False) or \
                entry.stat(follow_symlinks=False).st_uid != os.geteuid():
            return False
        # (no wait for a writer: a FIFO of that name, which no balancer makes, is
        # left alone. Bug: opening one waited there, and the balancer never started)
        fd = os.open(os.path.join(entry.path, LOCK),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: an arbiter or one of its children still runs
    finally:
        os.close(fd)
    return True
