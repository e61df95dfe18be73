"""The management API's view of every worker process (a `management.runtime.Runtime`).

Runs in the management process. Every call asks the workers' control
sockets (`balancer.control`) at that moment, all at once, and merges the
answers with `merge_snapshots`; the counters kept for workers that cannot
answer (`management.kept`: those that exited, from the run directory, and
the last complete answer of those that do not answer now) are folded in, so
counters never go backwards while the process tree lives: not across a
reload, a worker's crash, or a stopped worker.

Invariants:
* Stats are exact at scrape time: no worker pushes anything periodically.
* A write is published to every worker directly (`publish`: the control
  socket's ``apply``), whatever the store, and counts as applied once each
  worker answers that it serves the new version; the store's own messages
  and polling are the safety net for changes made elsewhere.
* Only hosts and backends a live worker reports are shown: kept counters
  fold into those, and a deleted host's go away with it. A survey of the
  active hosts names the hosts of the kept counters (`NAMED_SLICE` an ask),
  so the workers report them (idle) too.
* The retired counters of a host (or of a backend of its rule) are forgotten
  only after a complete survey in which every listed worker answered, every
  one serving the table the management process holds (`table`: its version,
  no problem), and none reported it, nor does that table hold the host
  (`unserved`). A worker behind, loading, silent or gone from an ask keeps
  everything, so a host that exists never loses its retired counters. Bug:
  they were kept for ever, so an operator creating and deleting hosts all
  day grew this process's memory, the run directory's total and every
  scrape's named hosts without bound.
* Live answers and the kept counters are read together under the run
  directory's lock (`control.run_dir_lock`), so a worker that exits is counted
  once, and two management processes (old and new, during a reload) never
  fold a retired worker twice. One greenlet at a time takes that lock
  (`mutex`), its turn and the lock had within `control.LOCK_WAIT` of its ask
  (`turn_and_lock`).
* A worker that does not answer (stopped, hung) is asked no more until it
  answers a probe again (`management.silent`): calls answer at once with the
  other workers' figures and its held counters (gauges left out), and name it
  in ``lagging``; a write never counts it as having applied.
* The management process answers during a big survey (`/metrics`, the
  history's sample): a survey asks for answers in lines
  (`balancer.control.encode`), decoded a line (100 hosts) at a time, and
  merged 200 hosts at a time (`merge_snapshots`), with a turn of the loop
  (`pause`) between two (a page of `/api/v1/stats` too). Bug: a worker's
  answer for 20,000 hosts (15 MB) was decoded in one call (0.3-0.5 s), and
  a silent worker's held counters decoded and merged in one go (1-3.5 s),
  with no request answered meanwhile.
* Surveys of the active hosts share their work: one asked while another is
  under way gets that one's merged snapshot (`active`), which nobody
  changes. So scrapes and the history's sample at the same time decode and
  merge once, and hold one snapshot. `hold_all` (`take_over`, `hand_over`)
  never shares: it must see the workers alive when it is called. A survey
  whose caller is killed leaves its sharers to survey for themselves.
* Without its run directory (deleted under a running balancer: ``rm -rf
  /tmp/balancer-*``) no worker can be asked: statistics answer 503
  `workers_unreachable` and a write 202 naming it, until the arbiter makes the
  directory again (within a turn of its loop: `balancer.startup.RunDirKeeper`)
  and the workers bind their sockets there again; one someone else made in its
  place is never used. Bug: statistics answered 500, and a write 200 that no
  worker had confirmed (read-your-writes broken).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore

from balancer.arbiter import STATUS_FILE
from balancer.control import (
    LOCK_WAIT,
    RunDirBusy,
    ask_raw,
    ask_why,
    busy,
    decoded,
    lock_path,
    pid_of,
    run_dir_lock,
    run_dir_problem,
    worker_sockets,
)
from balancer.stats import merge_snapshots, only_known
from balancer.turns import turn
from management.collector import COLLECTOR
from management.http import ApiError
from management.kept import Gone, HeldCounters, RetiredCounters, read_json
from management.silent import SilentWorkers

log = logging.getLogger("balancer.kept")
Kept = tuple[dict[str, Any] | None, list[dict[str, Any]]]  # retired total, held counters
# hosts named in one ask: 10,000 keys of at most 253 bytes (`balancer.rules.MAX_HOST_LEN`)
# stay under the control socket's line (`balancer.control.MAX_COMMAND`, 4 MiB). Bug: the
# hosts of the kept counters were named in one line, cut past 4 MiB (150,000 hosts): the
# worker was taken for silent at every scrape, and `/metrics` showed no host
NAMED_SLICE = 10_000
INFO_COMMAND = 'stats {"hosts": [], "totals": true}'  # no host's counters, each worker's totals


def _active_command(kept: list[str]) -> str:
    """The ``stats`` command of a survey of the active hosts and the `kept` ones."""
    return "stats " + json.dumps({"active": True, "hosts": kept, "lines": True})


class ClusterRuntime:
    """Stats, reload and readiness over all live workers of one arbiter."""

    def __init__(self, directory: str, store: Any, workers: int, apply_timeout: float = 2.0,
                 problem: Callable[[], str | None] | None = None,
                 table: Callable[[], Any] | None = None,
                 pause: Callable[[], None] = turn,
                 reload_own: Callable[[], object] | None = None) -> None:
        self.directory = directory
        self.store = store
        self.workers = workers
        self.apply_timeout = apply_timeout
        self.problem = problem or (lambda: None)  # the management process's view of the store
        self.table = table or (lambda: None)  # the `TableData` it holds, None if in doubt
        self.failing: dict[str, str] = {}  # path → why its statistics failed (`lagging`)
        self.reload_own = reload_own or (lambda: self.store.reload())  # (`Mirror.reload`)
        self.retired = RetiredCounters(directory)
        self.held = HeldCounters(self.retired, pause)
        self.mutex = Semaphore()  # the flock is per process: one greenlet holds it
        self.highest = 0  # the highest version a worker reported (`highest_version`)
        self.known_workers: set[int | None] = set()  # the pids that reported it
        self.silent = SilentWorkers(self._note_highest)
        self.arbiter_dropped = 0  # `arbiter_log_dropped`'s last answer
        self.pause = pause  # a turn of the loop between two slices of a big answer
        self.flight: AsyncResult | None = None  # the survey of the active hosts under way

    def survey(self, command: str | Callable[[list[str]], str], complete: bool = False
               ) -> tuple[list[dict[str, Any]], Kept]:
        """Every live worker's answer to `command` (or to the command made from the
        hosts the kept counters name), and the counters kept for the workers that
        exited or do not answer, read together. `complete`: the command asks
        for every host a worker counted (its answer is held: `HeldCounters`)."""
        self.check_run_dir()
        with self.locked():
            if self.retired.writing:  # (a draining one leaves its held answers: `hand_over`)
                self.held.adopt()
            listed = worker_sockets(self.directory)
            present = listed + self.held.unlisted(listed)  # (a run directory made again)
            self.held.retire_gone(present)
            retired = self.retired.snapshot()
            named: set[str] | None = None
            later: list[str] = []  # named hosts past the first slice
            if not isinstance(command, str):
                named = kept_hosts(retired, *self.held.missing(self.silent.silent, ()))
                ordered = sorted(named)
                command, later = command(ordered[:NAMED_SLICE]), ordered[NAMED_SLICE:]
            replies, answered = self.asked(listed, command, complete)
            held = self.held.missing(present, answered)
            unnamed = kept_hosts(*held) - named if named is not None else set()
            whole = complete and bool(listed) and answered == set(listed)
            if (later or unnamed) and replies:  # unnamed: only a worker silent just now counted
                whole = self.add_hosts(replies, answered, later + sorted(unnamed)) and whole
            if whole and retired:
                self.retired.forget(self.unserved(replies, retired))
            if complete:
                self.held.mirror()  # (every answer held is in the run directory)
            return replies, (retired, held)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """`turn_and_lock`; 503 `workers_unreachable` naming the lock's holder when it
        stays held (the other management process stuck)."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.turn_and_lock())
            except RunDirBusy as exc:
                raise ApiError(503, "workers_unreachable", f"{exc.strerror}: the workers' "
                               "counters cannot be read with the kept ones") from None
            yield

    @contextlib.contextmanager
    def turn_and_lock(self) -> Iterator[None]:
        """This greenlet's turn (`mutex`) and the run directory's lock (`run_dir_lock`),
        both had within one `LOCK_WAIT`; `RunDirBusy` else. Bug: the turn was waited
        for without end, then the lock `LOCK_WAIT`: with its holder stuck, requests
        that came together gave up `LOCK_WAIT` apart, one after the other (the 5th
        of 5 after 5 times as long; the dashboard's polls, scrapes and the history's
        samples queued up)."""
        since = time.monotonic()
        if not self.mutex.acquire(timeout=LOCK_WAIT):  # (another survey waits for it)
            raise busy(lock_path(self.directory), LOCK_WAIT)
        try:
            with run_dir_lock(self.directory, since=since):
                yield
        finally:
            self.mutex.release()

    def restore_kept(self) -> None:
        """Write the retired total again at once, the arbiter having made the run
        directory again (`RetiredCounters.snapshot`), not at the next survey.
        Bug: a reload before that survey (the history samples every 5 s) started
        a management process that found no total, and totals went down."""
        if self.run_dir_gone() is not None:
            return  # (gone again: the next survey tries)
        try:
            with self.turn_and_lock():
                self.retired.snapshot()
                self.held.mirror()  # (their files went with the directory)
        except OSError as exc:
            log.error("cannot write the counters of workers that exited in %s again: %s",
                      self.directory, exc.strerror or exc)

    def take_over(self) -> None:
        """Hold every worker's counters now, before this process reports ready
        (`hold_all`): a predecessor stops surveying once it is ready, so a worker
        killed from then on is retired from this one's (see `hand_over`)."""
        self.hold_all()

    def hand_over(self) -> None:
        """Leave the retired total to the successor (a reload's management process,
        ready before this one drains): from now on this one reads it, never writes
        it (`RetiredCounters.writing`). Bug: an API request it answered while
        draining, the run directory made again, wrote the total it last read
        (without the workers the reload retired) before its successor did, and
        totals went down.
        Then a last survey retires the workers killed since this one's last
        (their ``.held`` files, which the successor folds): the successor held
        every worker alive when it took over (`take_over`, before it was ready,
        so before this), and this one every worker that died before. Bug: a worker
        killed in the successor's first seconds (before its first survey, the
        history's sample up to 5 s on) was retired by neither, its counters lost.
        Every answer it holds then is in the run directory (`HeldCounters.mirror`,
        as at each survey, so also when this one fails), which the successor holds
        as its own where it holds none (`adopt`, at each survey): signalled
        directly (not a reload), this process hands over before its successor
        starts. Bug: a worker killed in between was held by neither.
        When the whole balancer stops (`stopping` in the arbiter's status) no
        survey: nobody comes next, and every answer left is deleted. Bug: each
        stop wrote every worker's answer (on a big table, megabytes each) into
        the run directory's file system, kept until the arbiter exited; then a
        survey still run while draining (a scrape, the history's sample) wrote
        them all back, and one writing as they were deleted put its file back."""
        self.retired.writing = False
        if self.tree_stops():
            self.held.dropped = True  # (a survey under way writes no more: `mirror`)
            with contextlib.suppress(OSError), self.turn_and_lock():
                self.held.drop_all()  # (after the file a survey under way was writing)
            return
        self.hold_all()

    def tree_stops(self) -> bool:
        """Whether the arbiter stops (its status file says so: `balancer.arbiter`)."""
        status = read_json(os.path.join(self.directory, STATUS_FILE))
        return isinstance(status, dict) and status.get("stopping") is True

    def hold_all(self) -> None:
        """A complete survey (the hosts every worker counted): each answer held,
        the counters of the workers gone since the last retired. Its own, never
        the one under way (`active`; bug: `hand_over` shared the history
        sample's, begun before a worker was killed, which no management process
        then retired); nothing merged. When it fails (the run directory's lock
        held, the directory gone), what is held is in the run directory still
        (`HeldCounters.mirror`, at each survey). Bug: a hand-over whose survey
        failed left nothing."""
        try:
            self.survey(_active_command, complete=True)
        except (ApiError, OSError) as exc:  # (no run directory: nothing to hold)
            log.warning("cannot survey the workers' counters: %s",
                        exc.message if isinstance(exc, ApiError) else exc)

    def run_dir_gone(self) -> str | None:
        """Why no worker can be asked: the run directory is gone, or not this
        balancer's any more (`control.run_dir_problem`); None while it is usable."""
        problem = run_dir_problem(self.directory)
        if problem is None:
            return None
        return (f"the run directory {self.directory} {problem}: the workers "
                f"keep serving but cannot be asked until the arbiter makes it again "
                f"(within a second of its removal)")

    def check_run_dir(self) -> None:
        """503 `workers_unreachable` when the run directory is gone."""
        gone = self.run_dir_gone()
        if gone is not None:
            raise ApiError(503, "workers_unreachable", gone)

    def add_hosts(self, replies: list[dict[str, Any]], answered: set[str],
                  hosts: list[str]) -> bool:
        """Add to each reply of an active survey its worker's entries of `hosts`
        (idle there: only kept counters make them shown), `NAMED_SLICE` at a time;
        whether every worker answered each ask."""
        every = True
        for start in range(0, len(hosts), NAMED_SLICE):
            command = "stats " + json.dumps({"hosts": hosts[start:start + NAMED_SLICE],
                                             "lines": True})
            more = {r["pid"]: r["stats"]["hosts"] for r in
                    self.asked(sorted(answered), command)[0] if "stats" in r}
            every = every and len(more) == len(answered)
            for reply in replies:
                own = reply["stats"]["hosts"]
                for key, entry in more.get(reply["pid"], {}).items():
                    own.setdefault(key, entry)
        return every

    def unserved(self, replies: list[dict[str, Any]], retired: dict[str, Any]) -> Gone:
        """The hosts of the `retired` total (and backends of their rules) that no
        worker serves, from every worker's answer to a complete survey; none
        unless each of them serves the table this process holds."""
        table = self.table()
        if table is None or any(not r.get("loaded") or r.get("version") != table.version
                                or "stats" not in r for r in replies):
            return {}
        answers = [r["stats"]["hosts"] for r in replies]
        gone: Gone = {}
        for host, entry in retired.get("hosts", {}).items():
            reported = [answer[host] for answer in answers if host in answer]
            if not reported:
                if host not in table.hosts:
                    gone[host] = None
                continue
            removed = [address for address in entry.get("backends", ())
                       if not any(address in r.get("backends", ()) for r in reported)]
            if removed:
                gone[host] = removed
        return gone

    def ask_all(self, command: str) -> list[dict[str, Any]]:
        """Every live worker's answer to `command` (workers that do not answer are
        left out, and silent ones not asked: `lagging` names them)."""
        return self.asked(worker_sockets(self.directory), command)[0]

    def asked(self, listed: list[str], command: str, complete: bool = False
              ) -> tuple[list[dict[str, Any]], set[str]]:
        """`ask_all` of the `listed` sockets, and the paths that answered (a
        `complete` command's answers are held)."""
        paths = self.silent.answering(listed)
        asked = self.silent.ask()
        jobs = [gevent.spawn(ask_raw, path, command) for path in paths]
        gevent.joinall(jobs)
        replies, answered = [], set()
        for path, job in zip(paths, jobs, strict=True):
            raw, why = job.value if job.successful() else (None, "no answer")
            reply, why = decoded(raw, why, self.pause)
            if reply is not None and not isinstance(reply.get("pid"), int):
                reply, why = None, "no usable answer: no pid"  # (sorted by it, merged)
            self.silent.note(path, reply, why, asked)
            if reply and command.startswith("stats") and self._failed_stats(path, reply):
                continue  # counted as it last answered (held), named in `lagging`
            if reply:
                replies.append(reply)
                answered.add(path)
                if complete and raw is not None and "stats" in reply:
                    self.held.keep(path, raw, reply)
        return sorted(replies, key=lambda r: r["pid"]), answered

    def _failed_stats(self, path: str, reply: dict[str, Any]) -> bool:
        """Whether `reply` to a ``stats`` command is a worker's failure (``{"pid",
        "error"}``: a command its control socket did not foresee), noted for `lagging`.
        Bug: every statistics call answered 500, each history sample failed."""
        if "stats" in reply:
            self.failing.pop(path, None)
            return False
        self.failing[path] = str(reply.get("error") or "no statistics")[:200]
        return True

    def lagging(self) -> list[dict[str, Any]]:
        """The live workers not answering now, and those whose statistics failed:
        ``{"pid", "version": None, "reason"}``."""
        listed = worker_sockets(self.directory)
        self.failing = {path: why for path, why in self.failing.items() if path in listed}
        return self.silent.lagging(listed) + [
            {"pid": pid_of(path), "version": None,
             "reason": f"its statistics failed ({why}): counted as it last answered"}
            for path, why in self.failing.items()]

    def stats(self, select: dict[str, Any] | None = None) -> dict[str, Any]:
        """The merged snapshot: every host's, or those `select` names
        (`management.runtime.Runtime.stats`)."""
        if select is None:
            return self._merged(*self.survey("stats", complete=True))
        if select.get("active"):  # and the hosts of the counters kept
            return self.active()
        replies, kept = self.survey("stats " + json.dumps({**select, "lines": True}))
        merged = self._merged(replies, kept)
        if "limit" in select:
            merged["next"] = page_end(merged, replies, select["limit"])
        return merged

    def active(self) -> dict[str, Any]:
        """The merged snapshot of the active hosts (and the kept counters' hosts),
        that of the survey under way if there is one (shared: read only)."""
        while self.flight is not None:
            shared = self.flight.get()
            if shared is not None:
                return shared  # type: ignore[no-any-return]
        self.flight = flight = AsyncResult()
        try:
            with COLLECTOR.held():
                merged = self._merged(*self.survey(_active_command, complete=True))
        except Exception as exc:
            flight.set_exception(exc)
            raise
        except BaseException:  # its caller killed: the sharers survey for themselves
            flight.set(None)  # (bug: the sampler's GreenletExit ended a scrape unanswered)
            raise
        finally:
            self.flight = None
        flight.set(merged)
        return merged

    def _merged(self, replies: list[dict[str, Any]], kept: Kept) -> dict[str, Any]:
        """The replies' snapshots summed (into the first reply's), with the counters
        kept (held, then retired) of the hosts and backends they show; with no
        reply, the held counters whole."""
        snapshots = [r["stats"] for r in replies]
        pause = self.pause
        merged = merge_snapshots(snapshots, True, pause)  # the replies were just decoded
        retired, held = kept
        if held:  # of workers listed but not answering: never of deleted hosts
            cut = [only_known(h, merged) for h in held] if snapshots else held
            merged = merge_snapshots([merged, *cut], True, pause)
        if retired:  # counters of hosts and backends still served, never deleted ones
            merged = merge_snapshots([merged, only_known(retired, merged)], True, pause)
        own = int(self.store.is_reachable() and self.problem() is None
                  and self.store.last_error() is None)
        merged["store_up"] = min(merged.get("store_up", own), own) if snapshots else own
        lagging = self.lagging()
        if lagging:
            merged["lagging"] = lagging
        return merged

    def reload(self) -> int:
        """Every worker re-reads the store now, then this process; the lowest
        version the workers serve."""
        from balancer.stores import StoreError, StoreUnavailable

        replies = self.ask_all("reload")
        errors = [r["error"] for r in replies if "error" in r]
        if errors:
            raise StoreUnavailable(errors[0])
        if not replies:
            raise StoreUnavailable("no worker answered; see the balancer log")
        try:
            self.reload_own()  # this process's view of the store too (`Mirror.reload`)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None
        return min(r["version"] for r in replies)

    def publish(self, version: int, changes: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """Tell every worker the management process wrote `version` (changing
        `changes`, or the whole table when None) and wait until each serves it, at
        most `apply_timeout` seconds; the workers that do not serve it by then."""
        body = {"version": version} if changes is None else {"version": version,
                                                              "hosts": dict(changes)}
        command = "apply " + json.dumps(body, separators=(",", ":"))
        every = worker_sockets(self.directory)
        paths = self.silent.answering(every)
        asked = self.silent.ask()
        jobs = [gevent.spawn(ask_why, path, command, self.apply_timeout) for path in paths]
        gevent.joinall(jobs, timeout=self.apply_timeout + 1.0)
        lagging = self.silent.lagging(every)  # never asked: not applied
        gone = self.run_dir_gone() if not every else None
        if gone is not None:
            lagging.append({"pid": None, "version": None, "reason": gone})
        for path, job in zip(paths, jobs, strict=True):
            reply, why = job.value if job.successful() else (None, "no answer")
            self.silent.note(path, reply, why, asked)
            if why == "gone":
                continue  # exited meanwhile: it serves nobody
            served = reply.get("version") if reply else None
            self._note_highest(reply)
            if isinstance(served, int) and served >= version:
                continue
            reason = why or (reply or {}).get("error") or (reply or {}).get("store_problem") \
                or f"serves version {served}"
            lagging.append({"pid": (reply or {}).get("pid", pid_of(path)), "version": served,
                            "reason": reason})
        return lagging

    def highest_version(self) -> int:
        """The highest version any worker has served or known (its snapshot).

        Each worker is asked once: afterwards its highest only moves with a table
        this process wrote (noted from `publish`'s answers) or one its own mirror
        reads from the store as well, so a write costs no extra round trip to
        every worker. Versions never go back, so a gone worker's highest stays."""
        pids = {pid_of(path) for path in self.silent.answering(worker_sockets(self.directory))}
        if not pids <= self.known_workers:
            for reply in self.ask_all("version"):
                self._note_highest(reply)
        return self.highest

    def _note_highest(self, reply: dict[str, Any] | None) -> None:
        """Remember a worker's highest version from its answer."""
        if reply and isinstance(reply.get("pid"), int) and isinstance(reply.get("highest"), int):
            self.known_workers.add(reply["pid"])
            self.highest = max(self.highest, reply["highest"])

    def is_ready(self) -> bool:
        """Ready when at least one worker answers and every answering worker has a table."""
        replies = self.ask_all("version")
        return bool(replies) and all(r.get("loaded") for r in replies)

    def info(self) -> dict[str, Any]:
        """Workers and store; costs no host's counters (each worker's totals are
        at most a second old)."""
        replies, kept = self.survey(INFO_COMMAND)
        processes = [process_info(r) for r in replies]  # before merging sums into the first
        merged = self._merged(replies, kept)
        return {"workers": self.workers,
                "processes": processes,
                **({"lagging": merged["lagging"]} if "lagging" in merged else {}),
                "arbiter": read_json(os.path.join(self.directory, STATUS_FILE)) or {},
                "store": {"kind": self.store.kind, "url": self.store.display_url,
                          "reachable": self.store.is_reachable(),
                          "version": merged.get("routing_version", 0),
                          "last_reload": merged.get("last_reload", 0.0),
                          "problem": self.store_problem(replies)}}

    def arbiter_log_dropped(self) -> int:
        """The arbiter's process log lines dropped (its status file, at most a loop
        turn old), never fewer than this process saw before (a counter: the file
        may be gone a while with the run directory)."""
        status = read_json(os.path.join(self.directory, STATUS_FILE))
        told = status.get("process_log_dropped") if isinstance(status, dict) else None
        if isinstance(told, int):
            self.arbiter_dropped = max(self.arbiter_dropped, told)
        return self.arbiter_dropped

    def store_problem(self, replies: list[dict[str, Any]]) -> str | None:
        """What is wrong with the store, if anything: lost table, corrupt, unreachable."""
        for problem in (self.problem(), self.store.last_error(),
                        *(r.get("store_problem") for r in replies)):
            if problem:
                return str(problem)
        if not self.store.is_reachable():
            return f"store {self.store.display_url} is unreachable"
        return None


def kept_hosts(*kept: dict[str, Any] | None) -> set[str]:
    """The hosts counted in `kept` (retired or held snapshots)."""
    return {host for snapshot in kept if snapshot for host in snapshot.get("hosts", {})}


def page_end(merged: dict[str, Any], replies: list[dict[str, Any]], limit: int) -> str | None:
    """Cut a merged page of hosts to `limit` (workers serving different tables
    may each add some); the key the next page starts after, or None at the end."""
    hosts = merged.get("hosts", {})
    keys = sorted(hosts)
    if len(keys) > limit:
        merged["hosts"] = {k: hosts[k] for k in keys[:limit]}
        return keys[limit - 1]
    if keys and any(r.get("more") for r in replies):
        return keys[-1]
    return None


def process_info(reply: dict[str, Any]) -> dict[str, Any]:
    """One worker's line in ``/api/v1/info`` (its answer to `INFO_COMMAND`)."""
    totals = reply.get("totals", {})
    return {"pid": reply["pid"], "started": reply["started"], "loaded": reply["loaded"],
            "draining": reply["draining"], "version": reply["version"],
            "store_problem": reply.get("store_problem"),
            "control_rebind_failures": reply.get("control_rebind_failures", 0),
            "open_connections": reply["stats"].get("open_connections", 0),
            "open_requests": totals.get("open_requests", 0),
            "completed_requests": totals.get("completed_requests", 0)}
