"""What is checked before children start, at start-up and on SIGHUP, and the
small process helpers the arbiter shares with it.

Invariants:
* The start-up check runs in a throwaway child, as the run user: the arbiter
  itself never opens a store or a log file (no connection or descriptor of
  it leaks into the workers), and files the check creates belong to the
  user the workers run as.
* What a reload cannot change (listen addresses, reuseport, user, group) is
  kept from the running settings, with a warning naming it.
* The run directory deleted under a running balancer is made again by the
  arbiter within a turn of its loop (`RunDirKeeper`), never one that someone
  else made in its place (`control.run_dir_problem`), and every child is told
  to bind its sockets there again (`REBIND`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from balancer.control import control_path, run_dir_problem
from balancer.privileges import Identity
from balancer.settings import Settings, SettingsError
from balancer.signal_queue import stop_asked
from balancer.workers import ChildEnv, fork_child, run_check

log = logging.getLogger("balancer")
CHECK_TIMEOUT = 30.0
STOP_POLL = 0.1  # seconds between looks at whether a stop was asked for, waiting for a child
EXIT_POLL = 0.01  # seconds between looks at a child's exit, without a pidfd
REBIND = signal.SIGHUP  # to a child: bind your sockets in the run directory again
REBIND_WINDOW = 10.0  # seconds after the run directory is made again: workers checked


def keep_bound(old: Settings, new: Settings) -> Settings:
    """`new`, with what a reload cannot change (every listen address, reuseport,
    user, group) kept from `old`; `SettingsError` if that leaves the management
    API beyond loopback without a token."""
    fixed = {"server.listen": (old.server.listen, new.server.listen),
             "server.internal_listen": (old.server.internal_listen, new.server.internal_listen),
             "server.reuseport": (old.server.reuseport, new.server.reuseport),
             "server.user": (old.server.user, new.server.user),
             "server.group": (old.server.group, new.server.group),
             "management.listen": (old.management.listen, new.management.listen),
             "tls.listen": (old.tls.listen, new.tls.listen)}
    changed = [name for name, (was, now) in fixed.items() if was != now]
    if changed:
        log.warning("SIGHUP: %s changed; that needs a restart, keeping the running value%s",
                    ", ".join(changed), "s" if len(changed) > 1 else "")
    server = replace(new.server, listen=old.server.listen,
                     internal_listen=old.server.internal_listen,
                     reuseport=old.server.reuseport,
                     user=old.server.user, group=old.server.group)
    management = replace(new.management, listen=old.management.listen)
    if not management.listen.is_loopback and not management.token:
        # Bug: a file without the token (and so the listen address too: a file
        # caught half-written, an edit back to loopback) reloaded the kept address
        # with no token, the API open to the network (SPEC §5).
        raise SettingsError([f"management.token: empty, but the management API keeps "
                             f"listening on {management.listen} (a restart changes that), "
                             "not a loopback address; set management.token"])
    tls = replace(new.tls, listen=old.tls.listen)
    return replace(new, server=server, management=management, tls=tls)


def check_in_child(settings: Settings, identity: Identity | None,
                   arbiter_fds: tuple[int, ...] = ()) -> tuple[int, str] | None:
    """Run the start-up check (`workers.run_check`) as `identity` in a throwaway child.

    Returns None, or (exit code, one-line problem)."""
    problem_r, problem_w = os.pipe()
    env = ChildEnv(settings, "", problem_w, None, os.getpid(), (*arbiter_fds, problem_r),
                   patch=False)
    flush_std()
    pid = fork_child(lambda e: run_check(e, identity), env)
    os.close(problem_w)
    code = wait_for_exit(pid, CHECK_TIMEOUT)
    message = read_pipe(problem_r).decode(errors="replace").strip()
    os.close(problem_r)
    if code == 0:
        return None
    return (code if code > 0 else 1), message or f"the start-up check failed ({code})"


def wait_for_exit(pid: int, timeout: float) -> int:
    """The exit code of child `pid`; killed (and 1) if it takes longer than `timeout`
    or a stop is asked for meanwhile (a store that does not answer must not hold
    `SIGTERM` for 30 s).

    Blocked on the child's pidfd, which is readable once it exited, for
    `STOP_POLL` at most between looks at a stop (a signal does not end `poll`,
    which is retried); where there is none (Linux before 5.3), polled every
    `EXIT_POLL` s. Bug: polled every 10 ms always, the start waited up to 10 ms
    more than the check took. Bug: waited with `select`, which refuses a
    descriptor past 1023: an arbiter holding that many (listeners per worker
    slot, children's pipes) died of a ValueError at a reload's check."""
    deadline = time.monotonic() + timeout
    try:
        exited: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        exited = None
    try:
        exit_seen = select.poll()
        if exited is not None:
            exit_seen.register(exited, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0 and not stop_asked():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if exited is None:
                time.sleep(min(left, EXIT_POLL))
            else:
                exit_seen.poll(min(left, STOP_POLL) * 1000)
    finally:
        if exited is not None:
            os.close(exited)
    kill_quietly(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return 1


def read_pipe(fd: int) -> bytes:
    """What a pipe holds now (up to 4 KiB); b"" at EOF or on an error."""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""


def kill_quietly(pid: int, signum: int) -> None:
    """Signal `pid`, which may already have exited."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def flush_std() -> None:
    """Before a fork: nothing buffered may be written twice (by parent and child)."""
    sys.stdout.flush()
    sys.stderr.flush()


def remake_run_dir(path: str) -> str | None:
    """Make the run directory `path` again (mode 0700) if it was deleted under the
    running balancer; None when it is there and private, else why it cannot be used.
    Bug: after ``rm -rf /tmp/balancer-*`` every reload's management process died
    binding its socket there, and nothing could reach the workers until a restart.
    A directory of that name that another user made (``/tmp`` is shared) is refused
    (`control.run_dir_problem`)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"the run directory {path} was deleted and cannot be made again: " \
               f"{exc.strerror or exc}"
    else:
        log.warning("the run directory %s was deleted: made again; the workers bind "
                    "their control sockets there again", path)
        return None
    problem = run_dir_problem(path)
    return None if problem is None else f"the run directory {path} {problem}"


class RunDirKeeper:
    """The arbiter's watch over its run directory, looked at once per loop turn.

    Bug: deleted under a running balancer (``rm -rf /tmp/balancer-*``,
    systemd-tmpfiles), it stayed gone until a reload or a restart: the workers
    could not be asked (statistics 503, writes 202), and once a reload made it
    again the counters kept there were gone, so totals went down."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.said: str | None = None  # the problem last logged (once per spell)
        self.until = 0.0  # checking that every worker bound its socket again, until then

    def keep(self, children: Iterable[Any]) -> bool:
        """Make the directory again if it is gone and tell every child (`REBIND`);
        whether it was made now. For `REBIND_WINDOW` seconds after, a ready worker
        whose control socket is missing is told again (one that was starting)."""
        children = list(children)
        if run_dir_problem(self.path) is None:
            self.said = None
            if time.monotonic() < self.until:
                for child in children:
                    if child.kind == "worker" and child.ready and not child.draining \
                            and not os.path.exists(control_path(self.path, child.pid)):
                        kill_quietly(child.pid, REBIND)
            return False
        problem = remake_run_dir(self.path)
        if problem is not None:
            if problem != self.said:
                log.error("%s; the workers serve on, but cannot be asked until it is "
                          "removed", problem)
            self.said = problem
            return False
        self.until = time.monotonic() + REBIND_WINDOW
        for child in children:
            kill_quietly(child.pid, REBIND)
        return True
