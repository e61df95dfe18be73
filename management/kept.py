"""Counters the management process keeps for workers it cannot ask.

Two kinds, both counters only (every gauge at its neutral value:
`balancer.control.counters_only`), so the cluster's sums never go down while
the process tree lives:

* retired: the final counters of workers that exited, summed in
  ``DIR/retired-total.json`` (`RetiredCounters`). A worker that exits
  gracefully writes its own ``DIR/retired-PID-STARTED.json``
  (`control.worker_identity`: a reused pid is another worker); for one that
  died without (killed, crashed) the management process writes its held
  counters in ``DIR/retired-PID-STARTED.held.json``.
* held: each live worker's last complete answer (`HeldCounters`: its reply to
  a ``stats`` of every host or of the active ones, kept as the bytes it sent),
  counted in place of its live counters while it does not answer (stopped,
  hung, or dead and not yet replaced).

Invariants (the caller holds the run directory's lock, `control.run_dir_lock`):
* A worker's counters are counted once: live (it answered), held (listed, no
  answer) or retired (its socket is gone). A held worker whose socket went is
  retired from its held counters unless it retired itself: its
  ``retired-PID-STARTED.json`` is still pending, or its identity is among those
  the total has folded (``"folded"``: another management process, during a
  reload, may have folded it first). Its own file and a ``.held`` one never
  both exist: it writes its own before its socket goes, under the lock.
* The retired total holds the hosts and backends the table still serves: a
  deleted host's retired counters (a backend's removed from its rule) are
  forgotten (`RetiredCounters.forget`) once a survey shows every worker
  serving the management process's table without it, as the workers forget
  their own (`balancer.stats.Stats.forget_hosts`). So an operator creating and
  deleting hosts all day, workers restarted now and then, leaves neither the
  file nor this process's memory nor a survey's list of named hosts growing;
  and a host that exists is never forgotten (its counters never go down).
* With no room in the run directory (a full file system) nothing kept is lost
  while this process lives: counters it cannot write (`RetiredCounters.unsaved`)
  or fold count from memory, and files not folded from disk; one line says so,
  and each is written once there is room, unless another management process
  retired that worker meanwhile. Bug: the OSError came out of every survey
  (`/metrics` and `/api/v1/stats` failed from the first dead worker on).
* The run directory deleted and made again (`balancer.startup.RunDirKeeper`)
  loses no total: the retired total last read is written again from memory
  (`_read_total`) by the management process that keeps the directory: never by
  one draining after a reload (`writing`: it neither folds, forgets nor writes
  the total again, its successor does; bug: an API request it still answered
  wrote its older total over its successor's, and totals went down; it counts
  the retired files not folded yet from disk, as with no room to write), and a
  worker whose socket went with the directory but whose process lives
  (`os.kill(pid, 0)`), and that has not retired, is counted from its held
  counters until it binds its socket again (`HeldCounters.unlisted`),
  never retired from them (bug: it would then be counted twice, retired and
  live). A retired file of a worker the total folded already is deleted, not
  folded twice. Bug: the total's file went with the directory, and totals went
  down.
* Held counters never replace newer ones: a worker's held bytes change only
  with its next complete answer; they are decoded only while it is missing, or
  to retire it. A ``.held`` file not folded yet (during a reload the draining
  management process and its successor both hold counters of the new workers,
  and either may retire a killed one first) is written again with each counter
  at the higher of its value there and the one held here
  (`stats.latest_snapshot`: a worker's counters only grow), so whichever
  process asked it last counts.
  A reload leaves no worker unheld: the successor surveys every worker before it
  reports ready, the draining process once more after (`ClusterRuntime.take_over`,
  `hand_over`). Every answer held is in the run directory as it is held
  (``held-ID.answer``, `HeldCounters.mirror`, written at the survey that got
  it when it changed), so however a management process ends (signalled
  directly and replaced once it drains, `SIGKILL`, a crash, a hand-over
  survey that fails) the next one holds them as its own where it holds none
  (`adopt`), and retires from them a worker killed before its first survey.
  What such a worker counted after the last survey that held it is lost (the
  history's sample every 5 s; longer only while no management process runs:
  its replacement's start, the crash backoff). A whole balancer stopping
  leaves none: no management process comes next. Bugs: the draining
  process's older counters, written first, were kept over its successor's
  newer ones (totals went down 12 to 8); that process writing none, the
  counters of a worker only it had asked were lost with it (8 to 5); a worker
  killed between a signalled process's hand-over and its replacement's
  take-over was held by neither (5 to 0); the answers were left only by a
  hand-over that ran whole, so a management process killed, crashed, or
  whose hand-over survey failed left none (10 to 3).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from balancer.control import (
    RETIRED_GLOB,
    control_path,
    counters_only,
    decoded,
    identity_of,
    pid_of,
    retired_path,
    worker_identity,
)
from balancer.stats import Stats, latest_snapshot, merge_snapshots

log = logging.getLogger("balancer.kept")

RETIRED_TOTAL = "retired-total.json"
HELD = ".held"  # a dead worker's retired file written from held counters: retired-ID.held.json
LEFT_GLOB = "held-*.answer"  # a held answer, for the next management process (`mirror`)
# bytes of a left answer read at most (`adopt`): 7 times a worker's answer for 100,000
# active hosts of one backend each (~0.35 KB a host: 6.9 MB for 20,000), the bound of the
# whole table's file (`balancer.stores.atomic.MAX_FILE_BYTES`)
MAX_LEFT = 256 << 20
StatKey = tuple[int, int, int]  # a file's inode, mtime (ns) and size
# bytes written between two turns of the loop (`write_bytes`): a worker's answer of 20,000
# hosts (15 MB) written in one call took 25-40 ms of the loop (a disk's page cache)
WRITE_SLICE = 1 << 20
FOLDED = "folded"  # the total's list of the workers folded into it (the latest `FOLDED_KEPT`)
FOLDED_KEPT = 1024  # a worker matters until each management process saw its socket go
Gone = dict[str, list[str] | None]  # host → its backends to forget, or None: the whole host


class RetiredCounters:
    """The summed counters of workers that exited (see `control.write_retired`)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.total_path = self.directory / RETIRED_TOTAL
        self.cached: tuple[Any, dict[str, Any] | None, tuple[str, ...]] = (None, None, ())
        # dead workers' counters not written yet, by `control.worker_identity`
        self.unsaved: dict[str, dict[str, Any]] = {}
        self.failing = False  # the last write in the run directory failed (reported)
        # False once a successor keeps the total (`ClusterRuntime.hand_over`): read only
        self.writing = True

    def snapshot(self) -> dict[str, Any] | None:
        """The retired total after folding in workers that exited since the last call
        (with no room to write, those not folded yet summed in from memory)."""
        failure = self._try(self._save_unsaved)
        pending = [p for p in sorted(self.directory.glob(RETIRED_GLOB))
                   if p.name != RETIRED_TOTAL]
        if pending and failure is None and self.writing:
            failure = self._try(lambda: self._fold(pending))
            pending = [] if failure is None else pending
        self._report(failure)
        total, folded = self._read_total()
        fresh = [str(p) for p in pending if _identity(str(p)) not in folded]  # not twice
        parts = [total, *map(read_json, fresh), *self.unsaved.values()]
        parts = [part for part in parts if part]
        return merge_snapshots(parts) if len(parts) > 1 else (parts[0] if parts else None)

    def retire(self, identity: str, snapshot: dict[str, Any]) -> None:
        """Leave dead worker `identity`'s held counters as its retired file (``.held``),
        or those pending there or in memory where they are higher (`latest_snapshot`),
        unless it is retired for good (`is_final`). In memory until there is room
        (`snapshot` sums them in)."""
        if self.is_final(identity):
            return
        kept = self.unsaved.get(identity)
        self.unsaved[identity] = snapshot if kept is None else latest_snapshot(kept, snapshot)
        self._report(self._try(self._save_unsaved))

    def has_retired(self, identity: str) -> bool:
        """Whether worker `identity`'s counters are retired (pending, folded or unsaved)."""
        return identity in self.unsaved or self.is_final(identity) \
            or os.path.exists(self._held_path(identity))

    def is_final(self, identity: str) -> bool:
        """Whether worker `identity`'s counters are retired for good: folded, or its
        own retired file pending (its last counters: none held are higher)."""
        return os.path.exists(retired_path(str(self.directory), identity)) \
            or identity in self._read_total()[1]

    def forget(self, gone: Gone) -> None:
        """Drop from the total the `gone` hosts (None) or some of their backends
        (`ClusterRuntime.unserved`: the table serves them no more). Only once
        everything pending is folded and written: else at a later call."""
        total, folded = self._read_total()
        if not gone or total is None or self.unsaved or self.failing or not self.writing \
                or any(p.name != RETIRED_TOTAL for p in self.directory.glob(RETIRED_GLOB)):
            return
        hosts = dict(total.get("hosts", {}))
        for host, backends in gone.items():
            if backends is None:
                hosts.pop(host, None)
            elif host in hosts:
                kept = dict(hosts[host].get("backends", {}))
                for address in backends:
                    kept.pop(address, None)
                hosts[host] = {**hosts[host], "backends": kept}
        smaller = {**total, "hosts": hosts}
        # no room to write: nothing is lost, they are forgotten at a later call (no line
        # said: one per survey would flood the log while the file system is full)
        if self._try(lambda: write_json(str(self.total_path),
                                        {**smaller, FOLDED: list(folded)})) is None:
            st = self.total_path.stat()
            self.cached = ((st.st_ino, st.st_mtime_ns, st.st_size), smaller, folded)

    def _held_path(self, identity: str) -> str:
        return str(self.directory / f"retired-{identity}{HELD}.json")

    def _save_unsaved(self) -> None:
        """Write each dead worker's counters kept in memory as its ``.held`` retired
        file, with those another management process wrote there where they are
        higher; none for a worker retired for good meanwhile (`is_final`)."""
        for identity, snapshot in list(self.unsaved.items()):
            if not self.is_final(identity):
                path = self._held_path(identity)
                pending = read_json(path)
                write_json(path, latest_snapshot(pending, snapshot)
                           if isinstance(pending, dict) else snapshot)
            del self.unsaved[identity]

    @staticmethod
    def _try(step: Callable[[], None]) -> OSError | None:
        try:
            step()
        except OSError as exc:
            return exc
        return None

    def _report(self, failure: OSError | None) -> None:
        """One line when writing starts failing, one when it works again."""
        if failure is not None and not self.failing:
            log.error("cannot write the counters of workers that exited in %s: %s; "
                      "kept in memory until there is room", self.directory,
                      failure.strerror or failure)
        elif failure is None and self.failing:
            log.info("the counters of workers that exited are written in %s again",
                     self.directory)
        self.failing = failure is not None

    def _fold(self, pending: list[Path]) -> None:
        total, folded = self._read_total()
        done = set(folded)
        fresh = [path for path in pending if _identity(str(path)) not in done]
        parts = ([total] if total else []) + [s for s in map(read_json, map(str, fresh)) if s]
        merged = merge_snapshots(parts) if parts else Stats().snapshot()
        merged[FOLDED] = [*folded, *(_identity(str(path)) for path in fresh)][-FOLDED_KEPT:]
        write_json(str(self.total_path), merged)
        for path in pending:
            with contextlib.suppress(OSError):
                path.unlink()

    def _read_total(self) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
        """The total's counters (without ``"folded"``) and the workers it folded."""
        try:
            st = self.total_path.stat()
        except FileNotFoundError:
            return self._restore()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self.cached[0] != key:
            total = read_json(str(self.total_path))
            folded = total.pop(FOLDED, []) if isinstance(total, dict) else []
            self.cached = (key, total, tuple(folded))
        return self.cached[1], self.cached[2]

    def _restore(self) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
        """The total last read, written again (its file went with the run
        directory); kept in memory while it cannot be written."""
        _, total, folded = self.cached
        if total is not None and self.writing and self._try(lambda: write_json(
                str(self.total_path), {**total, FOLDED: list(folded)})) is None:
            st = self.total_path.stat()
            self.cached = ((st.st_ino, st.st_mtime_ns, st.st_size), total, folded)
            log.warning("the counters of workers that exited written again in %s",
                        self.directory)
        return total, folded


class HeldCounters:
    """Each live worker's last complete answer (control socket path → bytes, and
    the worker's `control.worker_identity`)."""

    def __init__(self, retired: RetiredCounters, pause: Callable[[], None] | None = None
                 ) -> None:
        self.retired = retired
        self.pause = pause  # between two lines of a held answer decoded (`control.decoded`)
        self.raw: dict[str, tuple[bytes, str]] = {}
        self.decoded: dict[str, dict[str, Any]] = {}  # of the missing workers only
        self.left: dict[str, tuple[bytes, str]] = {}  # adopted beside one held (`adopt`)
        self.fresh: set[str] = set()  # held answers not in the run directory yet (`mirror`)
        # each held answer's file as this process last wrote or read it (`adopt`, `mirror`)
        self.known: dict[str, StatKey | None] = {}
        self.failing = False  # the last `mirror` could not write (reported)
        self.dropped = False  # the whole balancer stops: nothing written again (`drop_all`)

    def keep(self, path: str, raw: bytes, reply: dict[str, Any]) -> None:
        """Remember `raw`, worker `path`'s answer to a ``stats`` of every host
        (or of every host it counted: the active ones), decoded as `reply`. One
        held or left before of another worker of that pid is retired: it died.
        Bug: the new worker's answer replaced it, and its counters were lost."""
        identity = worker_identity(reply["pid"], reply.get("started", 0.0))
        left = self.left.pop(path, None)
        for before in (self.raw.get(path), left):
            if before is not None and before[1] != identity:
                self._retire(*before)
                self._delete(before[1])
        if left is not None or self.raw.get(path, (b"", ""))[0] != raw:
            self.fresh.add(path)  # (its file: `mirror`)
        self.raw[path] = (raw, identity)
        self.decoded.pop(path, None)

    def missing(self, listed: Iterable[str], answered: Collection[str]
                ) -> list[dict[str, Any]]:
        """The held counters of the `listed` workers not in `answered` (paths)."""
        wanted = [path for path in listed if path not in answered and path in self.raw]
        self.decoded = {path: self.decoded.get(path) or self._decode(path) for path in wanted}
        return [snapshot for snapshot in self.decoded.values() if snapshot]

    def mirror(self) -> None:
        """Write each held answer the run directory does not have yet (`fresh`, or its
        file gone with the directory) as ``held-ID.answer``, atomically, so that it
        outlives this process however it ends (`SIGKILL`, a crash, a hand-over
        survey that fails): the next management process holds it as its own
        (`adopt`). An answer the same as the one written before is not written
        again; a big one is written `WRITE_SLICE` at a time, the loop turning in
        between (`pause`: this process answers meanwhile). One line when writing
        starts failing (a full file system), one when it works again; what is not
        written is tried again at the next call.
        Bug: the answers were left only by a hand-over that ran whole, so a
        management process killed or crashed, or whose last survey failed, left
        none, and a worker killed before its replacement's first survey lost all
        its counters (10 -> 3)."""
        failure: OSError | None = None
        for path, (raw, identity) in list(self.raw.items()):
            name = self._file(identity)
            if self.dropped:
                return  # (a survey the draining process finishes: `drop_all`)
            if path not in self.fresh and _stat_key(name) is not None:
                continue
            try:
                write_bytes(name, raw, self.pause)
                self.known[name] = _stat_key(name)
                self.fresh.discard(path)
            except OSError as exc:
                failure = exc
        if failure is not None and not self.failing:
            log.error("cannot leave the workers' held counters in %s: %s; kept in memory "
                      "only until there is room", self.retired.directory,
                      failure.strerror or failure)
        elif failure is None and self.failing:
            log.info("the workers' held counters are written in %s again",
                     self.retired.directory)
        self.failing = failure is not None

    def adopt(self) -> None:
        """Hold as its own each answer another management process left in the run
        directory (`mirror`: one killed, or signalled and replaced once it drains),
        of a worker this one holds no answer of; one of a worker it holds an
        answer of is kept beside (`left`), retired from too (the higher counters:
        `retire_gone`) until the worker answers (`keep`). Each file is read once
        (not its own: `known`), at most `MAX_LEFT` bytes; one not a regular file,
        larger, or of no worker is deleted unread (one line). The files stay:
        each is this one's now, replaced by its next answer, deleted with its
        worker (`retire_gone`). Bugs: a worker killed between that process's
        last survey and this one's first was held by neither, its counters lost;
        at a reload the draining process's answer, newer than the successor's,
        was deleted unread, and a worker killed then retired from the older
        (8 -> 5); a FIFO under that name blocked every survey; a huge file was
        read whole."""
        directory = str(self.retired.directory)
        for path in self.retired.directory.glob(LEFT_GLOB):
            name = str(path)
            identity = path.name[len("held-"):-len(".answer")]
            pid = identity.partition("-")[0]
            socket = control_path(directory, int(pid)) if pid.isdecimal() else None
            raw, key = read_left(name, self.known.get(name))
            if raw is None and key is not None:
                continue  # (its own, or read before)
            if raw is None or socket is None:
                with contextlib.suppress(OSError):
                    path.unlink()
                self.known.pop(name, None)
                continue
            self.known[name] = key
            held = self.raw.get(socket)
            if held is None:
                self.raw[socket] = (raw, identity)
            elif held != (raw, identity):
                self.left[socket] = (raw, identity)

    def drop_all(self) -> None:
        """Delete every answer left in the run directory: the whole balancer stops,
        no management process comes next (each worker retires its own counters as
        it drains); none is written again (`mirror`). Bug: a survey the draining
        process still ran (a scrape it finished, the history's sample) found every
        file gone and wrote every answer back."""
        self.dropped = True
        for path in self.retired.directory.glob(LEFT_GLOB):
            with contextlib.suppress(OSError):
                path.unlink()
        self.known.clear()

    def unlisted(self, listed: Collection[str]) -> list[str]:
        """The held workers not `listed` whose process lives and that did not
        retire: their socket went with the run directory, and comes back. (A dead
        worker's pid taken by another process meanwhile keeps its counters held,
        not retired, until that process ends: counted once either way.)"""
        return [path for path, (_, identity) in self.raw.items() if path not in listed
                and _lives(pid_of(path)) and not self.retired.has_retired(identity)]

    def retire_gone(self, listed: Collection[str]) -> None:
        """Forget the workers whose socket went; retire the counters of those that
        did not retire theirs (killed, crashed) from what they held (where higher
        than another management process's: `RetiredCounters.retire`)."""
        for path in [path for path in self.raw if path not in listed]:
            raw, identity = self.raw.pop(path)
            self._retire(raw, identity, self.decoded.pop(path, None))
            self._delete(identity)
            self.fresh.discard(path)
            if path in self.left:
                raw, identity = self.left.pop(path)
                self._retire(raw, identity)
                self._delete(identity)

    def _file(self, identity: str) -> str:
        """The run directory's file of worker `identity`'s held answer (`mirror`)."""
        return os.path.join(self.retired.directory, f"held-{identity}.answer")

    def _delete(self, identity: str) -> None:
        """Delete worker `identity`'s held answer from the run directory (it died)."""
        name = self._file(identity)
        for leftover in (name, name + ".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        self.known.pop(name, None)

    def _retire(self, raw: bytes, identity: str, known: dict[str, Any] | None = None
                ) -> None:
        """Retire dead worker `identity` from its answer `raw` (`known`: decoded),
        unless it retired its own; decoded only then (a big table's)."""
        if not self.retired.is_final(identity):
            snapshot = known or self._counters(raw)
            if snapshot:
                self.retired.retire(identity, snapshot)

    def _decode(self, path: str) -> dict[str, Any]:
        """The counters of worker `path`'s held answer ({} if unusable)."""
        return self._counters(self.raw[path][0])

    def _counters(self, raw: bytes) -> dict[str, Any]:
        """The counters of a held answer `raw` ({} if unusable: one line, only a
        damaged one left in the run directory can be, `adopt`)."""
        reply, why = decoded(raw, "", self.pause)
        stats = reply.get("stats") if isinstance(reply, dict) else None
        if not isinstance(stats, dict):
            log.warning("held counters ignored, %s", why or "no usable answer: no stats")
            return {}
        return counters_only(stats)


def _identity(path: str) -> str:
    """The worker a retired file names (`control.identity_of`), its own or ``.held``."""
    return identity_of(path).removesuffix(HELD)


def _lives(pid: int | None) -> bool:
    """Whether process `pid` exists (a worker the arbiter reaped does not: it
    removes the worker's socket after reaping it)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat_key(path: str) -> StatKey | None:
    """`path`'s `StatKey`, None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_left(path: str, known: StatKey | None) -> tuple[bytes | None, StatKey | None]:
    """The bytes of left answer `path` and its `StatKey`; (None, key) when it is
    still the file `known` (not read again); (None, None) when it is missing,
    unreadable, not a regular file (a FIFO would block: opened non-blocking) or
    larger than `MAX_LEFT` (one line: read whole, a damaged or planted file of any
    size stalled this process and took its memory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None, None
    try:
        st = os.fstat(fd)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if not stat.S_ISREG(st.st_mode):
            return None, None
        if key == known:
            return None, key
        if st.st_size > MAX_LEFT:
            log.warning("held counters ignored, %s: %d bytes, more than the %d a worker's "
                        "answer can be", path, st.st_size, MAX_LEFT)
            return None, None
        with os.fdopen(os.dup(fd), "rb") as left:
            data = left.read(MAX_LEFT + 1)
        return (data, key) if len(data) <= MAX_LEFT else (None, None)
    except OSError:
        return None, None
    finally:
        os.close(fd)


def write_json(path: str, value: Any) -> None:
    """Write `value` to `path` atomically (`write_bytes`)."""
    write_bytes(path, json.dumps(value).encode())


def write_bytes(path: str, data: bytes, pause: Callable[[], None] | None = None) -> None:
    """Write `data` to `path` atomically (a reader sees all of it or nothing; a
    failed write leaves no part); `pause` called between two `WRITE_SLICE`s."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as out:
            view = memoryview(data)
            for start in range(0, len(view), WRITE_SLICE):
                if start and pause is not None:
                    pause()
                out.write(view[start:start + WRITE_SLICE])
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Any:
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
