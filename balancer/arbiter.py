"""The arbiter: forks the workers and the management process and keeps them alive.

Main loop (gunicorn `Arbiter.run`): wait for a signal or a child's "ready"
→ `handle_<signal>` → reap exited children → `manage` (start what is
missing, replace an older generation one child at a time, kill what
overstayed its deadline).

Invariants:
* Signal handlers only queue (`balancer.signal_queue`, installed as `balancer
  serve` starts); the loop reads the numbers and acts, once per signal number
  per turn: a burst of SIGHUPs costs one reload per turn of the loop, and the
  children converge on the last generation. Those that came while the balancer
  started are acted on before the first child is forked.
* The arbiter never monkey-patches and never runs a gevent hub; every child
  patches after fork (`balancer.workers`). It freezes its objects before each
  fork (`balancer.preload.freeze`), so the children keep sharing their pages;
  with `server.merge_pages` it marks its memory for the kernel's same-page
  merging before a fork (`mark_pages`), so every child it forks has it too.
  Once every child is ready it unmaps the pages of files' code it ran only
  to start (`balancer.heap.release_file_pages`).
* The listening sockets were bound before forking and stay open here until
  the arbiter stops: a dying worker never closes a listener. With one socket
  per worker slot (SO_REUSEPORT, `balancer.listening`) a worker forked into a
  slot again accepts from that slot's socket, where connections that came
  meanwhile wait; with one shared socket they wait for any live worker.
* Workers beyond `server.workers` (a reload lowered it) are retired only once
  no new worker is starting: their sockets' connections are then taken by
  the workers that serve those slots from now on.
* A child (a worker, the management process) that drains on its own (a
  signal sent to it, not to the arbiter) says so on its report pipe, and is
  replaced `SETTLE` later, as a reload replaces it, also when it has exited by
  then, unless the arbiter was told to stop meanwhile (the whole tree
  signalled, in any order). No child is forked once a stop began.
* A child that does not say it serves within `timeouts.start` of its fork is
  killed and started again with the crash backoff (`kill_unstarted`); the
  older generation's child it was to replace keeps serving meanwhile.
* During a graceful stop, SIGQUIT or a second SIGTERM/SIGINT stops at once; the
  line that says so, with the connections the workers cut, comes once every
  child is gone.
* A child of an older generation is told to drain only after its
  replacement reported ready; during a reload at most one replacement is
  starting at a time.
* A child that exits unasked is replaced with backoff; repeated exits are
  reported as a crash loop and slow down, they never spin.
* The run directory deleted is made again within a turn of the loop, and the
  children bind their sockets there again (`balancer.startup.RunDirKeeper`).
* The requests a worker that exited still counted against rules' limits
  (its journal: `balancer.limits.reclaim`) are given back when it is reaped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balancer import processlog
from balancer.backoff import Backoff
from balancer.control import control_path, run_dir_problem
from balancer.descriptors import log_limits, soft_limit
from balancer.heap import KSM_RUN, ksm_running, merge_pages, release_file_pages
from balancer.listening import Listeners
from balancer.preload import PreloadError, freeze, needed, preload
from balancer.privileges import Identity
from balancer.settings import Settings, SettingsError
from balancer.signal_queue import STOPS, SignalQueue
from balancer.startup import (
    RunDirKeeper,
    check_in_child,
    flush_std,
    keep_bound,
    kill_quietly,
    read_pipe,
    remake_run_dir,
)
from balancer.workers import (
    BOOT_ERROR,
    CUT,
    DRAINED,
    DRAINING,
    READY,
    ChildEnv,
    ManagementChild,
    fork_child,
    run_worker,
)

log = logging.getLogger("balancer")

STATUS_FILE = "arbiter.json"  # in the run directory; read by management.cluster
WORKER, MANAGEMENT = "worker", "management"
RUNNING, STOPPING, STOPPED = "RUNNING", "STOPPING", "STOPPED"
NEVER = float("inf")
RETIRE = signal.SIGUSR2  # to a child a reload replaced: drain, keep held requests
KILL_MARGIN = 2.0   # seconds past a draining child's own `graceful` before SIGKILL
# seconds a worker that drains on its own waits for its replacement: a stop signal the
# arbiter takes meanwhile means the whole tree was signalled (`on_draining`)
SETTLE = 0.1
QUIT_GRACE = 1.0    # seconds children get after SIGQUIT before SIGKILL
TICK = 1.0          # longest wait of the main loop
MAX_REPORT = 64     # bytes of a child's report line (`balancer.workers.tell_arbiter`)


@dataclass
class Child:
    """One forked child as the arbiter tracks it."""

    kind: str
    slot: int
    generation: int
    pid: int
    report_fd: int | None  # its report pipe (`balancer.workers.tell_arbiter`) until EOF
    graceful: float
    ready: bool = False
    draining: bool = False
    drained: bool = False  # its drain ended (`DRAINED`): it exits, nothing to cut
    kill_at: float = NEVER
    start_by: float = NEVER  # killed then unless it said it serves (`kill_unstarted`)
    replace_at: float = NEVER  # it drains on its own: replaced then (`on_draining`)
    timed_out: bool = False  # killed for not starting in time (told then, not at its exit)
    unread: bytes = b""    # the start of a report line not read whole yet

    def __str__(self) -> str:
        return f"{self.kind} {self.pid}"


@dataclass
class Cut:
    """A graceful stop cut short (SIGQUIT, a second SIGTERM or SIGINT): what the
    last line says once every child is gone."""

    why: str
    after: float          # seconds into the graceful stop
    workers: set[int]     # the pids of the workers still draining then
    connections: int = 0  # cut, as the workers said (`balancer.workers.CUT`)
    said: set[int] = field(default_factory=set)  # the workers that said


@dataclass(frozen=True)
class Bound:
    """What the arbiter bound before forking (kept for its whole life)."""

    listeners: Listeners   # the proxy listeners: one socket per slot, or one shared
    management: Any
    run_dir: str
    identity: Identity | None   # the identity the arbiter dropped to, if it did


class Arbiter:
    """Keeps `server.workers` proxy workers and one management process running."""

    def __init__(self, settings: Settings, bound: Bound, management: ManagementChild,
                 signals: SignalQueue, reload_settings: Callable[[], Settings] | None = None,
                 announce: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.bound = bound
        self.management = management
        self.reload_settings = reload_settings
        self.announce = announce  # called once, when every child first is ready
        self.generation = 1
        self.children: dict[int, Child] = {}
        self.backoff = Backoff()
        self.state = RUNNING
        self.graceful_since: float | None = None  # a graceful stop began then
        self.cut: Cut | None = None
        self.exit_code = 0
        self.has_been_ready = False
        self.unmap_pages = False  # every child ready: `release_file_pages` after `manage`
        self.signals = signals
        self.told_dropped = 0  # process log lines dropped, as `write_status` last wrote
        self.run_dir = RunDirKeeper(bound.run_dir)
        self.merging = False  # `server.merge_pages` as last applied (`mark_pages`)
        # slots whose child drained on its own and exited within `SETTLE`: replaced only
        # at its `replace_at` (`on_exit`), unless the arbiter is told to stop meanwhile
        self.settling: dict[tuple[str, int], Child] = {}

    # main loop -----------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; the exit code of `balancer serve`."""
        processlog.install()  # from here stderr never blocks the process (start-up is over)
        try:
            log.info("arbiter %d: starting %d worker(s)", os.getpid(),
                     self.settings.effective_workers())
            for signum in stops_first(self.signals.take()):  # (came while it started)
                self.handle(signum)
            self.manage()
            while self.state != STOPPED:
                signals, reporting = self.wait(self.next_timeout())
                # a signal repeated while the loop was busy acts once (a SIGHUP storm
                # is one reload per turn, not one per signal); before the children's
                # reports of the same turn: a worker draining because the whole tree
                # was signalled is not replaced
                for signum in stops_first(signals):
                    self.handle(signum)
                for child in reporting:
                    self.take_reports(child)
                self.reap()
                self.manage()
                if self.unmap_pages:
                    self.unmap_pages = False
                    # start-up's code (its own, a reload's imports) is not run here again
                    log.debug("arbiter: %d KiB of files' pages unmapped",
                              release_file_pages())
                made = self.state == RUNNING and self.run_dir.keep(self.children.values())
                if made or processlog.dropped() != self.told_dropped:
                    self.write_status()  # (dropped lines: the management process's metric)
            return self.exit_code
        finally:
            processlog.drain()  # the last lines (why it stopped), within EXIT_WAIT

    def wait(self, timeout: float) -> tuple[list[int], list[Child]]:
        """Signals queued meanwhile, and the children whose report pipe has lines."""
        pipes = {c.report_fd: c for c in self.children.values() if c.report_fd is not None}
        wake = self.signals.read_fd
        readable, _, _ = select.select([wake, *pipes], [], [], timeout)
        # read whether or not select saw it: a signal that came as select returned
        # (a report readable) ran its handler then. Bug: a SIGTERM sent to the whole
        # tree was taken a turn after a worker's report that it drains, and the
        # arbiter replaced that worker, taking it for one signalled alone
        return self.signals.take(), [pipes[fd] for fd in readable if fd != wake]

    def next_timeout(self) -> float:
        """Until the next thing `manage` has to do on time (at most `TICK`)."""
        now = time.monotonic()
        deadlines = [t for c in self.children.values()
                     for t in (c.kill_at, c.replace_at, c.start_by)]
        deadlines += [c.replace_at for c in self.settling.values()]
        deadlines.append(self.backoff.not_before)
        return min([TICK, *(d - now for d in deadlines if d > now)])

    def handle(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            # a second one cuts the graceful stop short (Ctrl-C twice, as gunicorn,
            # uvicorn, Traefik and Caddy); systemd sends one and waits
            again = self.graceful_since is not None
            self.stop(graceful=not again, why=signal.Signals(signum).name)
        elif signum == signal.SIGQUIT:
            self.stop(graceful=False, why="SIGQUIT")
        elif signum == signal.SIGHUP and self.state == RUNNING:
            self.reload()
        elif signum == signal.SIGUSR1:
            log.info("SIGUSR1: workers reopen their logs")
            self.signal_all(signal.SIGUSR1, kinds=(WORKER,))
        elif signum == RETIRE:
            log.warning("SIGUSR2: ignored (SIGHUP reloads, SIGTERM stops gracefully: "
                        "docs/operations.md#signals)")

    # children ------------------------------------------------------------------
    def take_reports(self, child: Child, exited: bool = False) -> None:
        """Act on the lines `child` wrote to its report pipe; at its end (the child
        exited), close it. `exited`: read to the end (the pipe is non-blocking)."""
        for _ in range(64 if exited else 1):  # (a child writes a few lines in its life)
            data = read_pipe(child.report_fd) if child.report_fd is not None else b""
            if not data:
                if child.report_fd is not None:
                    os.close(child.report_fd)
                    child.report_fd = None
                return
            *lines, rest = (child.unread + data).split(b"\n")
            # a line longer than any report is garbage (bug: kept whole, it grew by
            # up to 4 KiB a turn for good); its end is then taken for a line's start
            child.unread = rest if len(rest) <= MAX_REPORT else b""
            for line in lines:
                self.on_report(child, line.split())

    def on_report(self, child: Child, words: list[bytes]) -> None:
        if words == [READY]:
            self.on_ready(child)
        elif words == [DRAINING]:
            self.on_draining(child)
        elif words == [DRAINED]:
            child.drained = True
            if self.cut is not None:  # (its drain ended as the stop was cut short)
                self.cut.workers.discard(child.pid)
        elif len(words) == 2 and words[0] == CUT and words[1].isdigit() and self.cut \
                and child.pid in self.cut.workers:
            self.cut.connections += int(words[1])
            self.cut.said.add(child.pid)

    def on_ready(self, child: Child) -> None:
        if child.timed_out:  # (killed already: its `ready` was on its way)
            return
        child.ready = True
        log.info("%s ready (slot %d, generation %d)", child, child.slot, child.generation)
        self.write_status()
        if not all(c.ready for c in self.children.values()):
            return
        self.unmap_pages = True  # (after this turn's `manage`: the old generation is
        # told to drain first, not 30-80 ms later; bug: a reload's hand-over survey
        # then came after requests the new worker served, which it retired without)
        if not self.has_been_ready:
            self.has_been_ready = True
            if self.announce is not None and self.state == RUNNING:
                self.announce()

    def on_draining(self, child: Child) -> None:
        """A worker drains that the arbiter did not ask to: a signal sent straight
        to it (`kill PID`, `pkill`). Its replacement starts `SETTLE` later (unless
        the arbiter stops meanwhile), as a reload's does, not once it has
        exited. Bug: the connections the kernel gave its socket meanwhile waited
        for the drain to end (1.4-1.9 s, up to `timeouts.graceful` with a slow
        request in flight); and the management API, whose process finishes its
        API requests first (up to 5 s), answered no one meanwhile."""
        if child.draining or self.state != RUNNING:
            return  # (the arbiter asked; or it stops)
        # not at once: `pkill` signals by pid, the arbiter last once pids have
        # wrapped. Bug: workers draining because the whole tree was signalled were
        # replaced when the arbiter's own SIGTERM came a few ms after their reports
        child.replace_at = min(child.replace_at, time.monotonic() + SETTLE)

    def replace_drained(self) -> None:
        """Let the children that drain on their own since `SETTLE` be replaced."""
        now = time.monotonic()
        for child in self.children.values():
            if child.replace_at <= now and not child.draining:
                self.on_its_own(child)
        for slot, child in list(self.settling.items()):
            if child.replace_at <= now:
                del self.settling[slot]
                log.warning("%s drained on its own (a signal sent to it, not to the "
                            "arbiter) and exited; starting its replacement now", child)

    def on_its_own(self, child: Child) -> None:
        child.draining = True
        child.kill_at = time.monotonic() + child.graceful + KILL_MARGIN
        log.warning("%s drains on its own (a signal sent to it, not to the arbiter); "
                    "starting its replacement now", child)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self.on_exit(child, os.waitstatus_to_exitcode(status))

    def on_exit(self, child: Child, code: int) -> None:
        self.take_reports(child, exited=True)  # (what it said last, a `CUT` above all)
        with contextlib.suppress(OSError):
            os.unlink(control_path(self.bound.run_dir, child.pid))
        how = f"exited with code {code}" if code >= 0 else \
            f"was killed by {signal.Signals(-code).name}"
        from balancer.limits import FILE_NAME, reclaim  # the data plane's (preloaded)

        given = 0 if run_dir_problem(self.bound.run_dir) else \
            reclaim(os.path.join(self.bound.run_dir, FILE_NAME), child.pid)
        if given:
            log.warning("%s %s with %d request(s) in progress under a "
                        "max_connections_per_client limit: given back", child, how, given)
        if child.replace_at != NEVER and not child.draining and self.state == RUNNING:
            # it drained within `SETTLE`: no crash, but replaced only after it (bug: an
            # idle worker of a tree signalled whole was replaced before the arbiter's
            # own SIGTERM came: a process started during the stop)
            child.draining = True
            self.settling[(child.kind, child.slot)] = child
        if child.timed_out and self.state == RUNNING:
            return  # (told when it was killed: `kill_unstarted`)
        if child.draining or self.state != RUNNING:
            log.info("%s %s", child, how)
            return
        if code == BOOT_ERROR and not self.has_been_ready:
            log.error("%s could not start; stopping", child)
            self.exit_code = 1
            self.stop(graceful=False, why="start-up failure")
            return
        delay = self.backoff.record(time.monotonic())
        if self.backoff.is_looping():
            log.error("crash loop: %d unexpected exits in %.0f s (last: %s %s); "
                      "next start in %.1f s", self.backoff.recent(), self.backoff.window,
                      child, how, delay)
        else:
            log.warning("%s %s unexpectedly; restarting it in %.1f s", child, how, delay)
        self.write_status()

    def manage(self) -> None:
        """Start what is missing, replace old generations, kill what overstayed."""
        self.kill_overdue()
        self.kill_unstarted()
        if self.state == STOPPING and not self.children:
            self.state = STOPPED
            self.tell_cut()
        if self.state != RUNNING:
            return
        self.replace_drained()
        wanted = self.settings.effective_workers()
        for kind, slot in [(MANAGEMENT, 0), *((WORKER, i) for i in range(wanted))]:
            self.manage_slot(kind, slot)
        if self.is_starting():
            return  # an excess worker's slots are served by a new one once it is ready
        for child in list(self.children.values()):
            if child.kind == WORKER and child.slot >= wanted and not child.draining:
                self.drain(child)

    def manage_slot(self, kind: str, slot: int) -> None:
        active = [c for c in self.children.values()
                  if (c.kind, c.slot) == (kind, slot) and not c.draining]
        fresh = [c for c in active if c.generation == self.generation]
        if any(c.ready for c in fresh):
            for child in active:
                if child.generation != self.generation:
                    self.drain(child)
        elif fresh or time.monotonic() < self.backoff.not_before or \
                (kind, slot) in self.settling:
            return
        elif not active or not self.is_starting():
            self.spawn(kind, slot)

    def is_starting(self) -> bool:
        return any(not c.ready and not c.draining for c in self.children.values())

    def spawn(self, kind: str, slot: int) -> None:
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)  # read at its exit: what it wrote, then EOF
        env = self.child_env(ready_w, (ready_r,))
        flush_std()
        self.mark_pages()
        freeze()  # the arbiter's objects stay shared with the child (`balancer.preload`)
        pid = fork_child(self.child_body(kind, slot), env)
        os.close(ready_w)
        self.children[pid] = Child(kind, slot, self.generation, pid, ready_r,
                                   self.settings.timeouts.graceful,
                                   start_by=time.monotonic() + self.settings.timeouts.start)

    def mark_pages(self) -> None:
        """`server.merge_pages` as the settings say, for the child about to be
        forked (it inherits the mark; `balancer.heap.merge_pages`): tried once
        per value, so a refusal is logged once, and only when asked for (a kernel
        that refused the mark refuses its removal too; bug: a reload turning it
        off there warned that pages are not merged)."""
        wanted = self.settings.server.merge_pages
        if wanted == self.merging:
            return
        self.merging = wanted
        problem = merge_pages(wanted)
        if not wanted:
            return
        if problem:
            log.warning("server.merge_pages: %s; pages are not merged", problem)
        elif not ksm_running():
            log.warning("server.merge_pages: the host's ksmd is not running (%s is not 1): "
                        "no page is merged until it is", KSM_RUN)
        else:
            log.info("server.merge_pages: the processes' pages are merged by the host's ksmd")

    def child_body(self, kind: str, slot: int) -> Callable[[ChildEnv], int]:
        """What a new child runs, keeping open only the listeners it serves."""
        listeners, workers = self.bound.listeners, self.settings.effective_workers()
        if kind == WORKER:
            def worker(env: ChildEnv) -> int:
                # the management listener is the management process's alone. Bug: every
                # worker kept it, so after the arbiter was killed its port stayed taken
                # (a restart failed, connections hung) until the workers had drained
                self.bound.management.close()
                return run_worker(env, listeners.keep(slot, workers))
            return worker

        def management(env: ChildEnv) -> int:
            listeners.keep(None, workers)
            return self.management.run(env, self.bound.management)
        return management

    def child_env(self, ready_fd: int, own_fds: tuple[int, ...]) -> ChildEnv:
        return ChildEnv(self.settings, self.bound.run_dir, ready_fd, self.bound.identity,
                        os.getpid(), (*self.arbiter_fds(), *own_fds))

    def arbiter_fds(self) -> tuple[int, ...]:
        """Descriptors only the arbiter uses (a child closes them)."""
        pipes = (c.report_fd for c in self.children.values() if c.report_fd is not None)
        return (*self.signals.fds, *pipes)

    def drain(self, child: Child, signum: int = RETIRE) -> None:
        """Ask a child to finish what it serves and exit: retired by a reload
        (SIGUSR2, held requests wait for their rule) or stopped (SIGTERM, held
        requests are answered 503 at once)."""
        child.draining = True
        child.kill_at = time.monotonic() + child.graceful + KILL_MARGIN
        kill_quietly(child.pid, signum)

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.kill_at <= now:
                log.warning("%s did not stop in time; killing it", child)
                child.kill_at = NEVER
                kill_quietly(child.pid, signal.SIGKILL)

    def kill_unstarted(self) -> None:
        """Kill a child that did not say it serves within `timeouts.start` (stopped, or
        stuck in a read that never ends), and start another with the crash backoff:
        one line says both. The child of an older generation it was to replace
        (a reload) keeps serving meanwhile. Bug: a reload, or the start, waited for
        it for ever. Not once the arbiter stops: the stop's own deadline kills it
        (`kill_at`; bug: a stop at once said another was started)."""
        if self.state != RUNNING:
            return
        now = time.monotonic()
        for child in self.children.values():
            if child.start_by <= now and not child.ready and not child.draining:
                child.start_by = NEVER
                child.timed_out = True
                kill_quietly(child.pid, signal.SIGKILL)
                delay = self.backoff.record(now)
                log.error("%s did not start within %g s (timeouts.start): killed; starting "
                          "another in %.1f s%s", child, self.settings.timeouts.start, delay,
                          self.meanwhile(child))
                self.write_status()

    def meanwhile(self, child: Child) -> str:
        """What serves `child`'s slot while another is started, for the log line."""
        serving = [c for c in self.children.values() if (c.kind, c.slot) ==
                   (child.kind, child.slot) and c.ready and not c.draining]
        told = f" ({serving[0]} keeps serving)" if serving else ""
        if self.backoff.is_looping():
            told += (f" (crash loop: {self.backoff.recent()} unexpected exits in "
                     f"{self.backoff.window:.0f} s)")
        return told

    def signal_all(self, signum: int, kinds: tuple[str, ...] = (WORKER, MANAGEMENT)) -> None:
        for child in self.children.values():
            if child.kind in kinds:
                kill_quietly(child.pid, signum)

    # reload and stop -------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: re-read the settings; a new generation replaces every child."""
        if self.reload_settings is None:
            log.warning("SIGHUP: no settings source to re-read; ignored")
            return
        try:
            settings = keep_bound(self.settings, self.reload_settings())
        except SettingsError as exc:
            log.error("SIGHUP: keeping the running settings: %s", "; ".join(exc.problems))
            return
        try:  # a store of another kind: its module (after a drop: if still readable)
            preload(needed(settings, self.management.modules, self.bound.identity is not None))
        except PreloadError as exc:
            log.error("SIGHUP: keeping the running settings: %s; restart to use them", exc)
            return
        problem = remake_run_dir(self.bound.run_dir) or \
            check_in_child(settings, self.bound.identity, self.arbiter_fds())
        if problem is not None:
            log.error("SIGHUP: keeping the running settings: %s",
                      problem if isinstance(problem, str) else problem[1])
            return
        self.settings = settings
        self.generation += 1
        log.info("SIGHUP: settings re-read; replacing the management process and %d "
                 "worker(s) one by one (generation %d)", settings.effective_workers(),
                 self.generation)
        slots = self.bound.listeners.slots
        if 1 < slots < settings.effective_workers():
            log.warning("SIGHUP: %d workers share the %d listening sockets per address "
                        "bound at start; restart to give each its own",
                        settings.effective_workers(), slots)
        limit = soft_limit()
        log_limits(settings.server.max_connections, limit, limit)  # a new cap, if any
        self.write_status()

    def stop(self, graceful: bool, why: str) -> None:
        """Stop accepting and stop every child: drained (graceful) or at once; at
        once also cuts a graceful stop short."""
        if self.state != RUNNING and (graceful or self.graceful_since is None):
            return  # (stopping now already)
        if self.state == RUNNING:
            self.state = STOPPING
            self.bound.listeners.close()
            self.bound.management.close()
            self.write_status()  # (`stopping`: the management process hands nothing over)
        now = time.monotonic()
        if graceful:
            self.graceful_since = now
            log.info("%s: stopping gracefully (up to %.0f s; SIGQUIT, or %s again, "
                     "stops now)", why, self.settings.timeouts.graceful, why)
            for child in self.children.values():
                self.drain(child, signal.SIGTERM)
                child.kill_at = min(child.kill_at, now + child.graceful)
            return
        if self.graceful_since is not None:
            # a worker whose drain ended exits without a `CUT` (bug: one idle worker,
            # drained but not yet reaped, was counted as exiting without a word)
            workers = {c.pid for c in self.children.values()
                       if c.kind == WORKER and not c.drained}
            self.cut = Cut(why, now - self.graceful_since, workers)
            self.graceful_since = None
        else:
            log.info("%s: stopping now", why)
        self.signal_all(signal.SIGQUIT)
        for child in self.children.values():
            child.kill_at = min(child.kill_at, now + QUIT_GRACE)

    def tell_cut(self) -> None:
        """The line of a graceful stop cut short, once every child is gone."""
        cut = self.cut
        if cut is None:
            return
        unsaid = len(cut.workers - cut.said)
        log.warning("%s during the graceful stop: cut short after %.1f s (of up to %.0f s); "
                    "%d connection(s) cut in %d worker(s) still draining%s", cut.why,
                    cut.after, self.settings.timeouts.graceful, cut.connections,
                    len(cut.workers), f" ({unsaid} of them exited without saying how many)"
                    if unsaid else "")

    def write_status(self) -> None:
        """The arbiter's state for `/api/v1/info` (`DIR/arbiter.json`, replaced whole)."""
        now = time.monotonic()
        self.told_dropped = processlog.dropped()
        status = {"pid": os.getpid(), "generation": self.generation,
                  "workers": self.settings.effective_workers(),
                  "recent_crashes": self.backoff.recent(now),
                  "crash_loop": self.backoff.is_looping(now),
                  "process_log_dropped": self.told_dropped,
                  "stopping": self.state != RUNNING}
        if run_dir_problem(self.bound.run_dir) is not None:
            return  # never write by name into a directory someone else may have made
        path = os.path.join(self.bound.run_dir, STATUS_FILE)
        with contextlib.suppress(OSError):
            with open(path + ".tmp", "w") as out:
                json.dump(status, out)
            os.replace(path + ".tmp", path)


def stops_first(signals: list[int]) -> list[int]:
    """The signals of one turn, each once, a stop (SIGTERM, SIGINT, SIGQUIT) before the
    others, which then act as during a stop (a SIGHUP not at all). Bug: SIGHUP and
    SIGTERM in one turn, in that order, forked a reload's start-up check, then ended
    it for the stop (and logged the reload as refused)."""
    once = list(dict.fromkeys(signals))
    return [s for s in once if s in STOPS] + [s for s in once if s not in STOPS]
