"""The management API's view of every worker process (a `management.runtime.Runtime`).

Runs in the management process. Every call asks the workers' control
sockets (`balancer.control`) at that moment, all at once, and merges the
answers with `merge_snapshots`; counters of workers that already exited
gracefully are folded in from the run directory, so totals never go
backwards across a reload.

Invariants:
* Stats are exact at scrape time: no worker pushes anything periodically.
* A write is published to every worker directly (`publish`: the control
  socket's ``apply``), whatever the store, and counts as applied once each
  worker answers that it serves the new version; the store's own messages
  and polling are the safety net for changes made elsewhere.
* Only hosts and backends a live worker reports are shown: retired counters
  fold into those, and a deleted host's go away with it.
* Live answers and the retired total are read together under the run
  directory's lock (`control.run_dir_lock`), so a worker that exits is counted
  once, and two management processes (old and new, during a reload) never
  fold a retired worker twice. One greenlet at a time takes that lock.
* A worker that does not answer (stopped, hung) is asked no more until it
  answers a probe again (`management.silent`): calls answer at once with the
  other workers' figures and name it in ``lagging``; a write never counts it
  as having applied.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gevent
from gevent.lock import Semaphore

from balancer.arbiter import STATUS_FILE
from balancer.control import RETIRED_GLOB, ask_why, pid_of, run_dir_lock, worker_sockets
from balancer.stats import Stats, merge_snapshots, only_known
from management.silent import SilentWorkers

RETIRED_TOTAL = "retired-total.json"
INFO_COMMAND = 'stats {"hosts": [], "totals": true}'  # no host's counters, each worker's totals


class ClusterRuntime:
    """Stats, reload and readiness over all live workers of one arbiter."""

    def __init__(self, directory: str, store: Any, workers: int, apply_timeout: float = 2.0,
                 problem: Callable[[], str | None] | None = None) -> None:
        self.directory = directory
        self.store = store
        self.workers = workers
        self.apply_timeout = apply_timeout
        self.problem = problem or (lambda: None)  # the management process's view of the store
        self.retired = RetiredCounters(directory)
        self.mutex = Semaphore()  # the flock is per process: one greenlet holds it
        self.highest = 0  # the highest version a worker reported (`highest_version`)
        self.known_workers: set[int | None] = set()  # the pids that reported it
        self.silent = SilentWorkers(self._note_highest)

    def survey(self, command: str | Callable[[dict[str, Any] | None], str]
               ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Every live worker's answer to `command` (or to the command made from the
        retired total), and the retired total, read together."""
        with self.mutex, run_dir_lock(self.directory):
            retired = self.retired.snapshot()
            return self.ask_all(command if isinstance(command, str) else command(retired)), \
                retired

    def ask_all(self, command: str) -> list[dict[str, Any]]:
        """Every live worker's answer to `command` (workers that do not answer are
        left out, and silent ones not asked: `lagging` names them)."""
        paths = self.silent.answering(worker_sockets(self.directory))
        asked = time.time()
        jobs = [gevent.spawn(ask_why, path, command) for path in paths]
        gevent.joinall(jobs)
        replies = []
        for path, job in zip(paths, jobs, strict=True):
            reply, why = job.value if job.successful() else (None, "no answer")
            self.silent.note(path, reply, why, asked)
            if reply:
                replies.append(reply)
        return sorted(replies, key=lambda r: r["pid"])

    def lagging(self) -> list[dict[str, Any]]:
        """The live workers not answering now: ``{"pid", "version": None, "reason"}``."""
        return self.silent.lagging(worker_sockets(self.directory))

    def stats(self, select: dict[str, Any] | None = None) -> dict[str, Any]:
        """The merged snapshot: every host's, or those `select` names
        (`management.runtime.Runtime.stats`)."""
        if select is None:
            return self._merged(*self.survey("stats"))
        if select.get("active"):  # and the hosts retired workers counted
            def command(retired: dict[str, Any] | None) -> str:
                named = sorted((retired or {}).get("hosts", {}))
                return "stats " + json.dumps({"active": True, "hosts": named})
            return self._merged(*self.survey(command))
        replies, retired = self.survey("stats " + json.dumps(select))
        merged = self._merged(replies, retired)
        if "limit" in select:
            merged["next"] = page_end(merged, replies, select["limit"])
        return merged

    def _merged(self, replies: list[dict[str, Any]], retired: dict[str, Any] | None
                ) -> dict[str, Any]:
        """The replies' snapshots summed (into the first reply's), with the retired
        workers' counters of the hosts and backends they show."""
        snapshots = [r["stats"] for r in replies]
        merged = merge_snapshots(snapshots, in_place=True)  # the replies were just decoded
        if retired:  # counters of hosts and backends still served, never deleted ones
            merged = merge_snapshots([merged, only_known(retired, merged)], in_place=True)
        own = int(self.store.is_reachable() and self.problem() is None
                  and self.store.last_error() is None)
        merged["store_up"] = min(merged.get("store_up", own), own) if snapshots else own
        lagging = self.lagging()
        if lagging:
            merged["lagging"] = lagging
        return merged

    def reload(self) -> int:
        """Every worker re-reads the store now; the lowest version they serve."""
        from balancer.stores import StoreUnavailable

        replies = self.ask_all("reload")
        errors = [r["error"] for r in replies if "error" in r]
        if errors:
            raise StoreUnavailable(errors[0])
        if not replies:
            raise StoreUnavailable("no worker answered; see the balancer log")
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
        asked = time.time()
        jobs = [gevent.spawn(ask_why, path, command, self.apply_timeout) for path in paths]
        gevent.joinall(jobs, timeout=self.apply_timeout + 1.0)
        lagging = self.silent.lagging(every)  # never asked: not applied
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
        replies, retired = self.survey(INFO_COMMAND)
        processes = [process_info(r) for r in replies]  # before merging sums into the first
        merged = self._merged(replies, retired)
        return {"workers": self.workers,
                "processes": processes,
                **({"lagging": merged["lagging"]} if "lagging" in merged else {}),
                "arbiter": read_json(os.path.join(self.directory, STATUS_FILE)) or {},
                "store": {"kind": self.store.kind, "url": self.store.display_url,
                          "reachable": self.store.is_reachable(),
                          "version": merged.get("routing_version", 0),
                          "last_reload": merged.get("last_reload", 0.0),
                          "problem": self.store_problem(replies)}}

    def store_problem(self, replies: list[dict[str, Any]]) -> str | None:
        """What is wrong with the store, if anything: lost table, corrupt, unreachable."""
        for problem in (self.problem(), self.store.last_error(),
                        *(r.get("store_problem") for r in replies)):
            if problem:
                return str(problem)
        if not self.store.is_reachable():
            return f"store {self.store.display_url} is unreachable"
        return None


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
            "open_connections": reply["stats"].get("open_connections", 0),
            "open_requests": totals.get("open_requests", 0),
            "completed_requests": totals.get("completed_requests", 0)}


class RetiredCounters:
    """The summed counters of workers that exited gracefully (see `control.write_retired`)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.total_path = self.directory / RETIRED_TOTAL
        self.cached: tuple[Any, dict[str, Any] | None] = (None, None)

    def snapshot(self) -> dict[str, Any] | None:
        """The retired total after folding in workers that exited since the last call
        (the caller holds the run directory's lock)."""
        pending = [p for p in sorted(self.directory.glob(RETIRED_GLOB))
                   if p.name != RETIRED_TOTAL]
        if pending:
            self._fold(pending)
        return self._read_total()

    def _fold(self, pending: list[Path]) -> None:
        total = read_json(str(self.total_path))
        parts = ([total] if total else []) + [s for s in map(read_json, map(str, pending)) if s]
        tmp = self.total_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merge_snapshots(parts) if parts else Stats().snapshot()))
        os.replace(tmp, self.total_path)
        for path in pending:
            with contextlib.suppress(OSError):
                path.unlink()

    def _read_total(self) -> dict[str, Any] | None:
        try:
            st = self.total_path.stat()
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self.cached[0] != key:
            self.cached = (key, read_json(str(self.total_path)))
        return self.cached[1]


def read_json(path: str) -> Any:
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
