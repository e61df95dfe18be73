"""Run directories left behind by balancers that were killed, found and removed.

A balancer stopped by a signal it cannot catch (`SIGKILL`, the OOM killer) leaves
its run directory in ``$TMPDIR`` (`balancer.serve.make_run_dir`): 2.3 MiB of a
tmpfs, memory, for good. So the arbiter locks a file there (`hold`) on a
descriptor every child inherits: the lock is free only once the arbiter and every
child of it are gone, draining workers included. A starting balancer removes the
directories of its own user whose lock is free (`sweep`).

A directory without the lock file (made by a version before it, 2026-12-07; or
one being made: the lock comes after the privilege drop) is removed only when it
is provably nobody's (`_unused`): mode 0700, nothing in it but the files a
balancer makes (regular files and sockets of known names), its arbiter's status
(`arbiter.json`, written once the arbiter runs) naming a pid that no longer
exists, and no process holding a descriptor, a mapping or a bound socket there.

Invariants:
* The lock file appears under its name already locked (made under another
  name, locked, then renamed), so a sweep never takes a starting balancer's.
* Only directories named ``balancer-*`` that this user owns are looked at;
  symbolic links, FIFOs and anything unknown leave a directory alone, and so
  does any doubt (a file that cannot be read, no ``/proc``).
* Directories without the lock are left alone, all of them, said in one line,
  when this process cannot see every process of its user (`_blind`): ``/proc``
  mounted ``hidepid`` (another balancer's arbiter looks gone), or a balancer
  of this user that it cannot look into (one that dropped privileges from root
  is not dumpable: its descriptors and mappings cannot be read). Bug: with
  ``hidepid=2`` and a dropped run user, a live balancer's directory was judged
  on what ``/proc/net/unix`` showed of its sockets alone.
* Of the processes it cannot look into, only one whose command line names a
  balancer (or cannot be read) makes it blind (`_unseen`): no other holds a
  directory without the lock (balancers made them). Bug: any process of the
  user that is not dumpable (an ``ssh-agent``, a set-group-id program) did,
  so such directories were never removed, and every start said so.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterable

log = logging.getLogger("balancer")

LOCK = "alive.lock"
PREFIX = "balancer-"
STATUS = "arbiter.json"  # `balancer.arbiter.STATUS_FILE` (not imported: the arbiter imports this)
# every name a balancer makes in its run directory, with its writers' temporary files
KNOWN = re.compile(r"(arbiter\.json|history\.json(\.\d+)?|run\.lock|alive\.lock\.new"
                   r"|limits\.shm(\.\d+(\.reclaimed)?)?|last-good-[0-9a-f]+\.json"
                   r"|retired-(\d+-\d+(\.held)?|total)\.json|held-\d+-\d+\.answer"
                   r"|(worker|certs-management)-\d+\.sock"
                   r"|\.last-good-[0-9a-f]+\.json\.\w+)(\.tmp)?")
MAX_STATUS = 1 << 16  # bytes of `STATUS` read at most
MOUNTINFO = "/proc/self/mountinfo"
MAX_MOUNTINFO = 1 << 20  # bytes of it read at most
MAX_CMDLINE = 1 << 12  # bytes of a process's command line read at most (`_unseen`)


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
        entries = [e for e in os.scandir(parent)
                   if e.name.startswith(PREFIX) and e.path != run_dir and _mine(e)]
    except OSError:
        return removed
    unlocked = [e.path for e in entries if not _has_lock(e.path) and _unused(e.path)]
    if unlocked:  # (one look at every process, for all of them)
        held, blind = _held_paths()
        if blind is not None:
            log.warning("left %d run director%s without a lock (made by a balancer before "
                        "2026-12-07) alone: %s, so whether a process still uses them cannot "
                        "be told; remove them by hand once no such balancer runs: %s",
                        len(unlocked), "y" if len(unlocked) == 1 else "ies", blind,
                        ", ".join(unlocked))
        unlocked = [p for p in unlocked if blind is None and not _within(held, p)]
    for path in [*(e.path for e in entries if _left(e)), *unlocked]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d run director%s left by balancers that were killed: %s",
                 len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed


def _mine(entry: os.DirEntry[str]) -> bool:
    """A directory (not a link to one) of this user."""
    try:
        return entry.is_dir(follow_symlinks=False) and \
            entry.stat(follow_symlinks=False).st_uid == os.geteuid()
    except OSError:
        return False


def _has_lock(path: str) -> bool:
    """Whether something is named `LOCK` in `path` (a balancer's, or a doubt)."""
    try:
        os.lstat(os.path.join(path, LOCK))
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _left(entry: os.DirEntry[str]) -> bool:
    """Whether `entry`'s lock is free."""
    try:
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


def _unused(path: str) -> bool:
    """Whether unlocked run directory `path` is a balancer's whose arbiter is gone:
    mode 0700, only known names of regular files and sockets, all of this user,
    and an arbiter status naming a pid that no process has now. (A pid reused
    since keeps it: a doubt.) Whether a child still holds it: `_held_paths`."""
    uid = os.geteuid()
    try:
        if stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
            return False
        for entry in os.scandir(path):
            info = entry.stat(follow_symlinks=False)
            if not KNOWN.fullmatch(entry.name) or info.st_uid != uid or \
                    not (stat.S_ISREG(info.st_mode) or stat.S_ISSOCK(info.st_mode)):
                return False
        pid = _arbiter_pid(os.path.join(path, STATUS))
    except OSError:
        return False
    return pid is not None and not os.path.exists(f"/proc/{pid}")


def _arbiter_pid(status: str) -> int | None:
    """The pid of the arbiter's status file (a regular file), None when unreadable."""
    fd = os.open(status, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, MAX_STATUS)
    finally:
        os.close(fd)
    try:
        pid = json.loads(text).get("pid")
    except (ValueError, AttributeError):
        return None
    return pid if type(pid) is int and pid > 0 else None


def _held_paths() -> tuple[set[str], str | None]:
    """Every path a process has open (descriptors, mappings) or a socket bound to,
    as far as this user can see (every process, as root); and why that is not
    every process of this user, if it is not (`_blind`)."""
    held: set[str] = set()
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
        with open("/proc/net/unix", "rb") as table:
            held.update(_socket_paths(table))
    except OSError:
        return held, "/proc cannot be read"
    blind = _hidden_by_mount()
    for pid in pids:
        paths = _open_paths(f"/proc/{pid}")
        if paths is None:
            blind = blind or _unseen(pid)
        else:
            held.update(paths)
    return held, blind


def _unseen(pid: str) -> str | None:
    """Why process `pid` of this user, which cannot be looked into, leaves the sweep
    blind: its command line names a balancer (only one, of a version before the
    lock, holds a directory without it), or cannot be read; None for any other
    (an ``ssh-agent``, a set-group-id program) and for one gone or a zombie
    (an empty command line: it holds nothing)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            command = file.read(MAX_CMDLINE)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return f"process {pid} of this user cannot be looked into, nor its command line read"
    if b"balancer" not in command.lower():
        return None
    shown = command.replace(b"\0", b" ").strip().decode(errors="replace")[:80]
    return f"process {pid} of this user ({shown}) cannot be looked into (a balancer that " \
           "dropped privileges from root is not dumpable)"


def _hidden_by_mount() -> str | None:
    """Why ``/proc`` hides other processes from this one (mounted ``hidepid``,
    this process neither root nor in its ``gid=`` group), or None."""
    if os.geteuid() == 0:
        return None
    try:
        with open(MOUNTINFO, "rb") as table:
            lines = table.read(MAX_MOUNTINFO).decode(errors="replace").splitlines()
    except OSError:
        return f"{MOUNTINFO} cannot be read"
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/proc" and "-" in fields:
            after = fields[fields.index("-") + 1:]
            options = dict(o.partition("=")[::2] for o in (after[2:3] or [""])[0].split(","))
            hidden = options.get("hidepid", "0") not in ("0", "off")
            group = options.get("gid", "")
            if hidden and not (group.isdigit() and int(group) in (os.getegid(),
                                                                  *os.getgroups())):
                return f"/proc is mounted hidepid={options['hidepid']} (other processes hidden)"
    return None


def _socket_paths(table: Iterable[bytes]) -> list[str]:
    """The paths of ``/proc/net/unix``'s bound sockets."""
    paths = []
    for line in table:
        fields = line.split(maxsplit=7)
        if len(fields) == 8 and fields[7].startswith(b"/"):
            paths.append(os.fsdecode(fields[7].rstrip(b"\n")))
    return paths


def _open_paths(proc: str) -> list[str] | None:
    """The paths process `proc` (``/proc/PID``) has open or mapped (none once gone);
    None for a process of this user that this one cannot look into (`_is_mine`)."""
    paths: list[str] = []
    try:
        fds = os.listdir(f"{proc}/fd")
    except PermissionError:
        return None if _is_mine(proc) else paths
    except OSError:
        return paths
    try:
        for fd in fds:
            try:
                paths.append(os.readlink(f"{proc}/fd/{fd}"))
            except OSError:
                continue
        with open(f"{proc}/maps", "rb") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6:
                    paths.append(os.fsdecode(fields[5].rstrip(b"\n")))
    except OSError:
        pass
    return paths


def _is_mine(proc: str) -> bool:
    """Whether process `proc` runs as this user (any of its user ids), or cannot be
    told (its status unreadable too: ``hidepid=1``)."""
    try:
        with open(f"{proc}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    return os.geteuid() in map(int, line.split()[1:])
    except FileNotFoundError:
        return False  # (gone)
    except OSError:
        return True
    return True


def _within(held: set[str], directory: str) -> bool:
    """Whether any held path is in `directory` (" (deleted)" ones too)."""
    prefix = directory.rstrip("/") + "/"
    return any(path.startswith(prefix) for path in held)
