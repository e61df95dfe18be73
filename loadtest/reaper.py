"""The watcher that stops a run's processes when the run itself dies.

A run (``loadtest run``, a bench script, a test) starts its processes with
`guarded_popen`. The first call starts the watcher: ``python -I reaper.py``, in
its own session, reading a pipe whose only writer is the run. Each guarded
child lists itself in it, after fork and before exec (so no kill of the run
can fall between the start and the line): ``+PID START LEADER``, its start
time, read by the child itself, and whether its Popen was asked for a group
of its own, so the entry names it however late the watcher reads the line
(after the child exited and was reaped, its PID taken by another process); the
run writes ``-PID`` once it has stopped that child (`release`). End of file on
the pipe means the run is gone, however: it exited, or was killed with SIGKILL
and no cleanup of its own ran. Every process still listed then gets SIGTERM
(its whole process group when it leads one: nginx's and the balancer's
workers, whatever they forked), SIGKILL after `GRACE` seconds if anything is
left, and the watcher exits.

Why not ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the child
exits (the deploy scenario starts a backend from a short-lived thread), and
only for the direct child: an nginx master killed so leaves its worker
running (checked with nginx 1.22), as the master's SIGKILL leaves the group.

Invariants:
* The pipe's write end is close-on-exec and the run's alone, so end of file
  comes exactly when the run is gone (a child holds it only until its exec).
  A fork of the run that never execs holds it until it exits, and delays
  the watcher until then: ``multiprocessing``'s fork start (Linux's default
  before Python 3.14), which only `scripts/bench_slow_read.py` uses, for
  readers that stop by themselves after its ``--duration``.
* The watcher signals only the processes listed: each entry keeps the start
  time the child read from ``/proc/self/stat`` before its exec, and a PID
  that now names another process is skipped. A listed group leader that is
  gone may still have members: Linux reuses no number that a live group still
  uses as its id, so signalling that group reaches only them. So the run releases
  each leader it stops (`Processes.stop`): a leader reaped and never
  released leaves its number listed, which may name another group once the
  PIDs wrap (as `loadtest.procs.stop_group` would signal it too).
* A child not in a group of its own (``tests.support.Balancer`` shares the
  test's) gets the signal alone, never its group.
* This file runs on its own (``-I``: standard library only, whatever the
  run's path); the watcher side is `watch`, the run side `Reaper`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

GRACE = 1.0  # seconds between SIGTERM and SIGKILL once the run is gone
POLL = 0.05


# --- the watcher ------------------------------------------------------------------
def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name: [state, ppid, pgrp, ...]; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields and fields[2] == str(pgid) and fields[0] != "Z":
                members.append(int(entry))
    return members


@dataclass(frozen=True)
class Listed:
    """A process the watcher stops: its PID, start time and whether it leads a group."""

    pid: int
    started: str
    leader: bool

    @classmethod
    def read(cls, pid: int) -> Listed | None:
        """Process `pid` as ``/proc`` shows it now (None if gone)."""
        fields = stat_fields(pid)
        if fields is None:
            return None
        return cls(pid, fields[19], fields[2] == str(pid))

    @classmethod
    def parse(cls, line: bytes) -> Listed:
        """The entry a ``+PID START LEADER`` line lists (ValueError if malformed)."""
        pid, started, leader = line[1:].split()
        return cls(int(pid), started.decode(), leader == b"1")

    def line(self) -> bytes:
        """The ``+PID START LEADER`` line that lists this process with the watcher."""
        return b"+%d %s %d\n" % (self.pid, self.started.encode(), self.leader)

    def is_same(self) -> bool | None:
        """True: the PID is still this process; False: another one's; None: no one's."""
        fields = stat_fields(self.pid)
        return None if fields is None else fields[19] == self.started

    def is_alive(self) -> bool:
        if self.leader:
            return self.is_same() is not False and bool(group_members(self.pid))
        fields = stat_fields(self.pid)
        return fields is not None and fields[19] == self.started and fields[0] != "Z"

    def signal(self, signum: int) -> None:
        same = self.is_same()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.leader and same is not False:
                os.killpg(self.pid, signum)
            elif same:
                os.kill(self.pid, signum)


def read_list(stream: BinaryIO) -> dict[int, Listed]:
    """Follow the run's ``+PID``/``-PID`` lines until end of file: what is listed then."""
    listed: dict[int, Listed] = {}
    for line in stream:
        with contextlib.suppress(ValueError):
            if line.startswith(b"+"):
                entry = Listed.parse(line)
                listed[entry.pid] = entry
            elif line.startswith(b"-"):
                listed.pop(int(line[1:]), None)
    return listed


def stop_listed(listed: list[Listed], grace: float = GRACE) -> None:
    """SIGTERM every listed process (group), SIGKILL what is left after `grace`."""
    for entry in listed:
        entry.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := [e for e in listed if e.is_alive()]) and time.monotonic() < deadline:
        time.sleep(POLL)
    for entry in left:
        entry.signal(signal.SIGKILL)


def watch() -> None:
    """The watcher's whole life: list from stdin, then stop what is listed."""
    for signum in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals are the run's to handle
        signal.signal(signum, signal.SIG_IGN)
    stop_listed(list(read_list(sys.stdin.buffer).values()))


# --- the run's side -----------------------------------------------------------------
def _enlist(fd: int, leader: bool) -> None:
    """In the child, between fork and exec: list it with the watcher. `leader`:
    it leads a group of its own by its exec, as its Popen was asked (the
    standard library's makes the session before this call, gevent's after)."""
    fields = stat_fields(os.getpid())
    assert fields is not None  # this process's own /proc entry
    os.write(fd, Listed(os.getpid(), fields[19], leader).line())


class Reaper:
    """The run's end of the watcher: started on first use, and again (with the
    children still running) when it has died or this process is a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watcher: subprocess.Popen | None = None
        self._fd = -1
        self._owner = 0  # the PID that started the watcher
        self._children: dict[int, subprocess.Popen] = {}

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """`subprocess.Popen` of a child the watcher stops if this process dies."""
        with self._lock:
            fd = self._ensure()
            leader = bool(kwargs.get("start_new_session")) or kwargs.get("process_group") == 0
            child = subprocess.Popen(argv, preexec_fn=functools.partial(_enlist, fd, leader),
                                     **kwargs)
            self._children[child.pid] = child
            return child

    def release(self, child: subprocess.Popen) -> None:
        """Unlist a child this process has stopped (and reaped)."""
        with self._lock:
            self._children.pop(child.pid, None)
            if self._fd >= 0 and self._owner == os.getpid():
                with contextlib.suppress(OSError):
                    os.write(self._fd, b"-%d\n" % child.pid)

    def _ensure(self) -> int:
        if (self._watcher is not None and self._owner == os.getpid()
                and self._watcher.poll() is None):
            return self._fd
        if self._fd >= 0:  # a dead watcher's, or (in a fork) the parent's
            os.close(self._fd)
        self._children = {pid: c for pid, c in self._children.items() if c.poll() is None}
        read, self._fd = os.pipe()
        try:
            self._watcher = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__)], stdin=read,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(read)
        self._owner = os.getpid()
        for pid in self._children:  # not reaped, so the PID is still theirs
            if (entry := Listed.read(pid)) is not None:
                os.write(self._fd, entry.line())
        return self._fd


REAPER = Reaper()


def guarded_popen(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen(argv, **kwargs)` of a child (and, with
    ``start_new_session=True``, its whole group) that cannot outlive this
    process by more than `GRACE` seconds."""
    return REAPER.popen(argv, **kwargs)


def release(child: subprocess.Popen) -> None:
    """Tell the watcher a guarded child was stopped and reaped (its PID is free)."""
    REAPER.release(child)


if __name__ == "__main__":
    watch()
