"""Per-worker control sockets: how the management process sees every worker.

Each worker serves a unix socket ``DIR/worker-PID.sock`` (DIR is the
arbiter's private run directory, mode 0700, owned by the run user). A client
sends one command line and reads one JSON reply until EOF:

* ``stats``  → ``{"pid", "loaded", "draining", "version", "highest", "started",
  "store_problem", "stats": SNAPSHOT}``, every host's counters; ``stats JSON``
  the same with only some hosts' (`select_hosts`), costing those hosts only:
  ``{"hosts": [KEY...]}`` those keys; ``{"after": KEY, "limit": N}`` the
  first N keys above KEY in sorted order (and ``"more"``: whether any follow);
  ``{"active": true, "hosts": [KEY...]}`` the hosts that have seen a request
  and those keys. ``"totals": true`` adds ``"totals": {"open_requests",
  "completed_requests"}`` over every host (recounted at most once a second).
  ``"lines": true`` asks for the answer in lines (`encode`): the reply with no
  host, ``"lines": N`` in it, then N lines each a JSON object of up to `SLICE`
  hosts, so that a big answer is decoded a line at a time (`decoded` with a
  `pause`: the management process answers meanwhile), never in one call.
* ``reload`` → ``{"pid", "version"}`` or ``{"pid", "error": TEXT}``
* ``version`` → ``{"pid", "loaded", "version", "highest", "store_problem"}`` (cheap: no stats)
* ``apply JSON`` → ``{"pid", "version", "highest", "store_problem"}`` once the worker serves
  the write the management process just made: JSON is ``{"version": N,
  "hosts": {HOST: RULE or null}}`` (the hosts one write changed, applied
  without reading the store) or ``{"version": N}`` (a whole table: the worker
  reads the store). This is how a write is live when the API answers
  (read-your-writes), whatever the store.
* ``top JSON`` → ``{"pid", "counts": {KEY: [count, error]}, "sketch": {...}}`` and
  ``inflight JSON`` → ``{"pid", "requests": [...], "left_out"}``: the worker's
  heavy hitters and its requests open now (`balancer.diagnosis`).
* ``challenges`` → ``{"pid", "challenges": N}`` once the worker serves the ACME
  challenges the store holds now (the issuer just published one:
  `balancer.challenges`), or ``{"pid", "error": TEXT}``.
* ``certs`` → ``{"pid", "certs": N}`` once the worker's TLS listeners serve the
  certificates the store holds now (the management process just wrote one:
  `balancer.tls.refresh`), or ``{"pid", "error": TEXT}``.
* ``certs-missing JSON`` → ``{"pid", "missing": [HOST...]}``: which of the
  hosts JSON names (``{"hosts": [HOST...]}``) the worker's TLS listeners serve
  no certificate of; ``certs-fill JSON`` → ``{"pid", "added": N}``: JSON is
  ``{"signature": TEXT, "hosts": {HOST: RECORD}}``, certificates the store
  cannot give while it is damaged, which the management process hands to a
  worker that misses them (`balancer.tls.fill`; private keys travel only over
  this socket, in the run directory, never to a file).
* ``certs-collect JSON`` → ``{"pid", "certs": {HOST: RECORD}}``: JSON is
  ``{"signature": TEXT}``; the records of the certificates the worker serves
  that the store hides now (all it serves while the store's certificates
  cannot be read as a whole, else those of its damaged records), none once
  the store's signature is no longer TEXT: a management process restarted
  while the store is damaged, with no predecessor to take them from,
  collects them so (`balancer.tls.collect`).
* ``loop`` → ``{"pid", "holds_gil", "holds", "held", "alone"}``: whether the
  worker's gevent loop runs its pending callbacks in one hold of the GIL per
  batch, and what it ran so (`balancer.evgil.counts`).

Invariants:
* Nothing is exchanged per request: a snapshot is built from the worker's
  plain counters only when asked (at scrape time), `SLICE` hosts at a time
  (built, then encoded), the worker's loop running in between: a big answer
  never stalls live requests for long.
* A worker that exits gracefully leaves its final counters in
  ``DIR/retired-PID-STARTED.json`` (gauges zeroed; `worker_identity`), so
  cluster totals never go backwards across a reload.
* A missing or dead socket is skipped, never an error: workers come and go.
  A worker whose socket file went with the run directory binds it again when
  the arbiter, having made the directory again, tells it (`rebind`); one that
  cannot says so once and tries again, less and less often, until it can.
* Every command whose client still waits gets one JSON reply: a bad one, or
  one whose values no check foresaw (`safe_answer`), an ``{"pid",
  "error"}``; the worker goes on. A
  command line is read within `CONTROL_TIMEOUT` of the connection, in all (a
  silent or trickling client is cut then), and up to `MAX_COMMAND` bytes.
* An ask whose client has closed its end by the time its command is read is
  dropped unanswered: asks that gave up while the worker was stopped or busy
  cost nothing when it resumes.
* A worker's counters are either live (its socket is listed) or retired,
  never both: retiring (write the file, remove the socket) and reading
  (list, ask, fold the retired files) hold the run directory's lock. The
  lock is polled, never blocked on, so a gevent process keeps answering.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from balancer import processlog

log = logging.getLogger("balancer")

COMMANDS = ("stats", "reload", "version", "apply", "top", "inflight", "challenges", "certs",
            "certs-missing", "certs-fill", "certs-collect", "loop")
CONTROL_TIMEOUT = 2.0
MAX_COMMAND = 4 * 1024 * 1024  # an `apply` carries one write's rules (the API takes 1 MiB)
WORKER_GLOB = "worker-*.sock"
RETIRED_GLOB = "retired-*.json"
LOCK_POLL = 0.005
# seconds a management process waits for the run directory's lock (`run_dir_lock`): its
# holder (the other management process of a reload) holds it for one survey
LOCK_WAIT = 10.0
PROC_LOCKS = "/proc/locks"
TOTALS_EVERY = 1.0  # seconds: how stale `stats {"totals": true}` may be
MAX_PAGE = 10000  # hosts in one `stats {"after", "limit"}` answer
SLICE = 100  # hosts snapshotted or encoded between two turns of the worker's loop
REBIND_FIRST = 0.5  # seconds before a failed `rebind` is tried again, doubling each time
REBIND_LONGEST = 30.0  # ... up to this


def control_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"worker-{pid}.sock")


def worker_identity(pid: int, started: float) -> str:
    """A worker's name among the retired counters: its pid and when its control
    server started (microseconds), so a reused pid names another worker. Bug:
    named by pid alone, a worker killed with the pid of one among the last 1,024
    retired was taken for retired already and its counters were lost."""
    return f"{pid}-{round(started * 1_000_000)}"


def retired_path(directory: str, identity: str) -> str:
    """The retired counters file of the worker `identity` (`worker_identity`)."""
    return os.path.join(directory, f"retired-{identity}.json")


def identity_of(path: str) -> str:
    """The `worker_identity` a retired counters file (`retired_path`) names."""
    return Path(path).stem.partition("-")[2]


# worker side --------------------------------------------------------------------
class ControlServer:
    """Answers control commands for one worker (run inside the worker's gevent hub)."""

    def __init__(self, directory: str, worker: Any) -> None:
        self.path = control_path(directory, os.getpid())
        self.worker = worker
        self.started = time.time()
        self.counted: tuple[float, dict[str, int]] = (-TOTALS_EVERY, {})  # (when, totals)
        self.directory = directory
        self.closed = False
        self.rebind_failures = 0  # attempts to bind the socket again that failed, in all
        self.failing = 0  # those since it was last bound
        self.retry: Any = None  # the greenlet that tries again (`rebind`)
        self.server = self._listen()

    def _listen(self) -> Any:
        """A server on a socket newly bound at `path` (its inode noted: `rebind`)."""
        from gevent.pool import Pool

        from balancer.resting import RestingServer

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a recycled pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            listener.listen(64)
            info = os.stat(self.path)
        except OSError:
            listener.close()
            raise
        self.bound = (info.st_dev, info.st_ino)
        return RestingServer(listener, self.handle, spawn=Pool(16))

    def start(self) -> None:
        self.server.start()

    def rebind(self) -> None:
        """Listen at `path` again if the socket there is gone (the run directory
        deleted and made again by the arbiter: `startup.RunDirKeeper`); never in a
        directory that is not the run directory any more (`run_dir_problem`). A
        failure (no room, a read-only directory, something else at `path`) is one
        line, counted (`rebind_failures`, in ``/api/v1/info``), and tried again
        after `REBIND_FIRST` seconds, doubling up to `REBIND_LONGEST`. Bug: it
        came out of the SIGHUP handler as a traceback, one per SIGHUP (the
        arbiter sends one a second for 10 s), and was never tried again."""
        if self.closed:
            return  # retired: its counters are in its retired file, never live again
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # (a directory it may not search any more)
            self._rebind_failed(exc)
            return
        else:
            if (info.st_dev, info.st_ino) == self.bound:
                return  # still ours
        problem = run_dir_problem(self.directory)
        if problem is not None:
            log.error("cannot answer the management process: the run directory %s %s",
                      self.directory, problem)
            return
        try:
            server = self._listen()
        except OSError as exc:
            self._rebind_failed(exc)
            return
        old, self.server = self.server, server
        old.close()  # (its socket file is gone: nothing to unlink)
        self.server.start()
        log.info("control socket %s bound again%s", self.path, "" if not self.failing else
                 f" after {self.failing} failed attempt{'s' if self.failing > 1 else ''}")
        self.failing = 0

    def _rebind_failed(self, exc: OSError) -> None:
        """Count a failed `rebind`, say so once, and try again later (one greenlet)."""
        import gevent

        self.rebind_failures += 1
        self.failing += 1
        # the exponent bounded: 2 ** 1024 is no float (bug: OverflowError after 1024
        # failures in a row, 8.5 h, and it was never tried again)
        delay = min(REBIND_LONGEST, REBIND_FIRST * 2.0 ** min(self.failing - 1, 64))
        if self.failing == 1:
            log.error("cannot bind the control socket %s again: %s; the management "
                      "process cannot ask this worker; trying again in %g s, then less "
                      "and less often", self.path, _short_error(exc), delay)
        if self.retry is None:
            self.retry = gevent.spawn_later(delay, self._try_again)

    def _try_again(self) -> None:
        self.retry = None
        self.rebind()

    def close(self) -> None:
        """Stop answering and remove the socket file."""
        self.closed = True
        if self.retry is not None:
            self.retry.kill(block=False)
        self.server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def handle(self, sock: socket.socket, address: Any) -> None:
        try:
            command = _read_command(sock, time.monotonic() + CONTROL_TIMEOUT)
            sock.settimeout(CONTROL_TIMEOUT)
            if _hung_up(sock):
                return  # an ask given up while this worker was stopped or busy
            sock.sendall(encode(self.safe_answer(command), _turn))
        except OSError:
            pass
        finally:
            sock.close()

    def safe_answer(self, command: str) -> dict[str, Any]:
        """`answer`, and for a command no check foresaw, an error reply naming
        what failed (the worker goes on; the reply is still one JSON object)."""
        try:
            return self.answer(command)
        except Exception as exc:  # noqa: BLE001 - the one place a command's failure is told
            name, what = command.partition(" ")[0][:32], _short(exc)
            log.warning("control command %r failed: %s", name, what)
            return {"pid": os.getpid(), "error": f"{name}: failed: {what}"}

    def answer(self, command: str) -> dict[str, Any]:
        worker = self.worker
        if command.startswith("apply "):
            return self.apply(command[len("apply "):])
        if command.startswith(("top ", "inflight ")):
            return self.diagnose(command)
        if command.startswith(("certs-missing ", "certs-fill ", "certs-collect ")):
            return self.certs_gap(command)
        if command.startswith("stats "):
            return self.selected_stats(command[len("stats "):])
        if command == "version":
            return {"pid": os.getpid(), "loaded": worker.loaded,
                    "version": worker.holder.table.version,
                    "highest": worker.tables.highest, "store_problem": worker.tables.store_problem}
        if command == "reload":
            from balancer.stores.base import StoreError

            try:
                return {"pid": os.getpid(), "version": worker.reload()}
            except StoreError as exc:
                return {"pid": os.getpid(), "error": str(exc)}
        if command in ("challenges", "certs"):
            from balancer.stores.base import StoreError

            reread = worker.reload_challenges if command == "challenges" else worker.reload_certs
            try:
                return {"pid": os.getpid(), command: reread()}
            except StoreError as exc:
                return {"pid": os.getpid(), "error": str(exc)}
        if command == "stats":
            return self.stats_reply(None)
        if command == "loop":
            from balancer.evgil import counts

            return {"pid": os.getpid(), "holds_gil": getattr(worker.io, "holds_gil", False),
                    **counts()}
        return {"pid": os.getpid(), "error": f"unknown command {command[:64]!r}; "
                                             f"commands are {', '.join(COMMANDS)}"}

    def stats_reply(self, keys: list[str] | None) -> dict[str, Any]:
        worker = self.worker
        return {"pid": os.getpid(), "loaded": worker.loaded, "draining": worker.draining,
                "version": worker.holder.table.version, "highest": worker.tables.highest,
                "started": self.started, "store_problem": store_problem(worker),
                "control_rebind_failures": self.rebind_failures,
                "stats": worker_snapshot(worker, keys, _turn)}

    def selected_stats(self, text: str) -> dict[str, Any]:
        """``stats JSON`` (see the module doc); a bad query is an error."""
        try:
            query = json.loads(text)
            keys, more = select_hosts(self.worker.stats, query)
        except (ValueError, TypeError) as exc:
            return {"pid": os.getpid(), "error": f"stats: bad query: {exc}"}
        reply = self.stats_reply(keys)
        reply["more"] = more
        if query.get("totals"):
            reply["totals"] = self.totals()
        if query.get("lines") is True:
            reply["lines"] = 0  # how many: counted by `encode`
        return reply

    def totals(self) -> dict[str, int]:
        """Open and completed requests over every host, at most a second old."""
        now = time.monotonic()
        if now - self.counted[0] >= TOTALS_EVERY:
            open_requests, completed = self.worker.stats.totals()
            self.counted = (now, {"open_requests": open_requests,
                                  "completed_requests": completed})
        return self.counted[1]

    def certs_gap(self, command: str) -> dict[str, Any]:
        """``certs-missing``, ``certs-fill`` and ``certs-collect`` (see the module
        doc); a bad one is an error."""
        from balancer.stores.base import StoreError

        name, _, text = command.partition(" ")
        try:
            query = json.loads(text)
            if name == "certs-collect":
                signature = query["signature"]
                if not isinstance(signature, str):
                    raise ValueError("expected {\"signature\": TEXT}")
                return {"pid": os.getpid(), "certs": self.worker.collect_certs(signature)}
            if name == "certs-missing":
                hosts = query["hosts"]
                if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                    raise ValueError("hosts must be a list of host names")
                return {"pid": os.getpid(), "missing": self.worker.missing_certs(hosts)}
            signature, records = query["signature"], query["hosts"]
            if not isinstance(signature, str) or not isinstance(records, dict) \
                    or not all(isinstance(r, dict) for r in records.values()):
                raise ValueError("expected {\"signature\": TEXT, \"hosts\": {HOST: RECORD}}")
            return {"pid": os.getpid(), "added": self.worker.fill_certs(signature, records)}
        except (ValueError, TypeError, KeyError) as exc:
            return {"pid": os.getpid(), "error": f"{name}: bad query: {exc!r}"[:200]}
        except StoreError as exc:
            return {"pid": os.getpid(), "error": str(exc)}

    def diagnose(self, command: str) -> dict[str, Any]:
        """``top`` and ``inflight`` (see the module doc); a bad query is an error."""
        from balancer import diagnosis
        from balancer.sketch import describe

        name, _, text = command.partition(" ")
        try:
            query = json.loads(text)
            if not isinstance(query, dict):
                raise diagnosis.BadQuery("the query must be a JSON object")
            if name == "top":
                return {"pid": os.getpid(), "counts": diagnosis.top(self.worker, query),
                        "sketch": describe(self.worker.stats.top)}
            return {"pid": os.getpid(), **diagnosis.inflight(self.worker, query)}
        except (ValueError, diagnosis.BadQuery) as exc:
            return {"pid": os.getpid(), "error": f"{name}: {exc}"}

    def apply(self, text: str) -> dict[str, Any]:
        """Serve the version the management process just wrote (see the module doc)."""
        from balancer.stores.base import StoreError

        worker = self.worker
        try:
            doc = json.loads(text)
            version, changes = doc["version"], doc.get("hosts")
            if type(version) is not int or version < 0:
                raise ValueError(f"version must be a whole number, got {str(version)[:32]}")
            served = worker.tables.catch_up(version, changes if isinstance(changes, dict) else None)
        except (ValueError, KeyError, TypeError) as exc:
            return {"pid": os.getpid(), "error": f"apply: bad message: {exc}"}
        except StoreError as exc:
            return {"pid": os.getpid(), "version": worker.holder.table.version,
                    "error": str(exc), "store_problem": worker.tables.store_problem}
        return {"pid": os.getpid(), "version": served, "highest": worker.tables.highest,
                "store_problem": worker.tables.store_problem}


def select_hosts(stats: Any, query: Any) -> tuple[list[str], bool]:
    """The host keys a ``stats JSON`` query names, and whether a page has more
    (see the module doc). Raises ValueError or TypeError for a bad query."""
    if not isinstance(query, dict):
        raise ValueError("the query must be a JSON object")
    named = query.get("hosts", [])
    if not isinstance(named, list) or not all(isinstance(k, str) for k in named):
        raise ValueError("hosts must be a list of host keys")
    if query.get("active"):
        active = stats.active_keys()
        seen = set(active)
        return active + [k for k in named if k not in seen], False
    if "limit" in query:
        after, limit = query.get("after") or "", query["limit"]
        if not isinstance(after, str) or not isinstance(limit, int) or \
                not 0 < limit <= MAX_PAGE:
            raise ValueError(f"after must be a host key and limit 1 to {MAX_PAGE}")
        return stats.page(after, limit)
    return named, False


def worker_snapshot(worker: Any, keys: list[str] | None = None,
                    pause: Callable[[], None] | None = None) -> dict[str, Any]:
    """The worker's stats snapshot (of the hosts `keys` only, unless None),
    with its own view of the store; with `pause`, built `SLICE` hosts at a
    time, calling `pause` in between (the worker's loop turns)."""
    if keys is None or pause is None or len(keys) <= SLICE:
        snapshot = worker.stats.snapshot(keys)
    else:
        snapshot = worker.stats.snapshot(keys[:SLICE])
        for start in range(SLICE, len(keys), SLICE):
            pause()
            snapshot["hosts"].update(worker.stats.snapshot(keys[start:start + SLICE])["hosts"])
    usable = store_problem(worker) is None
    snapshot["store_up"] = int(usable and worker.store.is_reachable())
    snapshot["access_log_dropped"] = worker.access_log.dropped_total
    snapshot["process_log_dropped"] = processlog.dropped()
    return snapshot


def store_problem(worker: Any) -> str | None:
    """What this worker's view of the store finds wrong: a table it will not serve,
    or its watch's error (bug: a deleted routes file or a Redis down left it null
    in ``/api/v1/info``'s processes, the store reported unreachable above them)."""
    return worker.tables.store_problem or worker.store.last_error()


def encode(reply: dict[str, Any], pause: Callable[[], None]) -> bytes:
    """`reply` as JSON; a snapshot of many hosts is encoded `SLICE` hosts at a
    time, calling `pause` in between (the same bytes as one `json.dumps`); a
    reply with ``"lines"`` in lines (`_in_lines`)."""
    hosts = reply.get("stats", {}).get("hosts") or {}
    if "lines" not in reply and len(hosts) <= SLICE:
        return json.dumps(reply).encode()
    reply["stats"]["hosts"] = {}
    slices = [{k: hosts[k] for k in part} for part in _slices(list(hosts))]
    if "lines" in reply:
        return _in_lines(reply, slices, pause)
    head, _, tail = json.dumps(reply).partition('"hosts": {}')
    parts = [head.encode(), b'"hosts": {']
    for n, part in enumerate(slices):
        if n:
            pause()
            parts.append(b", ")
        parts.append(json.dumps(part)[1:-1].encode())
    parts += [b"}", tail.encode()]
    return b"".join(parts)


def _slices(keys: list[str]) -> list[list[str]]:
    return [keys[start:start + SLICE] for start in range(0, len(keys), SLICE)]


def _in_lines(reply: dict[str, Any], slices: list[dict[str, Any]],
              pause: Callable[[], None]) -> bytes:
    """`reply` (its hosts taken out as `slices`) in lines: the reply, ``"lines"``
    the count of slices, then each slice on a line of its own (a JSON string
    holds no raw newline), each line ended by a newline."""
    reply["lines"] = len(slices)
    parts = [json.dumps(reply).encode()]
    for n, part in enumerate(slices):
        if n:
            pause()
        parts.append(json.dumps(part).encode())
    return b"\n".join([*parts, b""])


def _turn() -> None:
    """Let the worker's loop go round (requests, timers) between two slices of a
    big answer (`balancer.turns.turn`)."""
    from balancer.turns import turn

    turn()


def retire(directory: str, worker: Any, control: ControlServer) -> None:
    """Hand a drained worker's counters over from its socket to a retired file (none
    in a run directory gone or someone else's: one line says they are lost; nor
    with its lock held `LOCK_WAIT`, one line: the management process retires them
    as it last asked this worker. Bug: a traceback, the worker's exit code 1)."""
    problem = run_dir_problem(directory)
    if problem is not None:
        log.error("cannot leave this worker's counters: the run directory %s %s; the "
                  "totals of /api/v1/stats lose them", directory, problem)
        control.close()
        return
    try:
        with run_dir_lock(directory):
            write_retired(directory, worker, control.started)
            control.close()
            return
    except RunDirBusy as exc:
        log.error("cannot leave this worker's counters: %s; the management process "
                  "counts them as it last asked this worker", exc.strerror)
    control.close()


def write_retired(directory: str, worker: Any, started: float) -> None:
    """Leave the counters of an exiting worker (its control server `started` then)
    for the management process to keep. Bug: with the run directory's file system
    full the worker exited with a traceback (code 1) and left its part written;
    now one line says what is lost."""
    path = retired_path(directory, worker_identity(os.getpid(), started))
    tmp = path + ".tmp"
    # idle hosts' counters are zeros: leaving them out changes no total
    body = json.dumps(counters_only(worker_snapshot(worker, worker.stats.active_keys())))
    try:
        with open(tmp, "w") as out:
            out.write(body)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        log.error("cannot leave this worker's counters in %s: %s; the totals of "
                  "/api/v1/stats and /metrics lose them", path, exc.strerror or exc)


def counters_only(snapshot: dict[str, Any]) -> dict[str, Any]:
    """`snapshot` with every gauge set to its neutral value for `merge_snapshots`,
    and no backend's ``problem`` (bug: kept with the counters of a worker gone,
    it showed on the backend up again, for as long as its host existed)."""
    snapshot.update(open_connections=0, lingering_connections=0, routing_version=0,
                    store_up=1, last_reload=0.0)
    for host in snapshot.get("hosts", {}).values():
        host.update(open_requests=0, spinning=0)
        for backend in host.get("backends", {}).values():
            backend.update(state="up", in_flight=0, tunnels=0)
            backend.pop("problem", None)
    return snapshot


class RunDirBusy(OSError):
    """The run directory's lock stayed held longer than `LOCK_WAIT` (`run_dir_lock`)."""


@contextlib.contextmanager
def run_dir_lock(directory: str, wait: float | None = None,
                 since: float | None = None) -> Iterator[None]:
    """Hold the run directory's exclusive lock (polled: the gevent hub keeps running);
    `RunDirBusy`, naming its holder, when it is not free within `wait` (`LOCK_WAIT`)
    seconds of `since` (monotonic; now by default). Bug: it was waited for without
    end, so a holder stuck (stopped by a debugger, SIGSTOP) held every survey of the
    other management process (its statistics, its start's `take_over`: it never
    said it serves)."""
    import gevent

    path = lock_path(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    limit = LOCK_WAIT if wait is None else wait
    try:
        deadline = (time.monotonic() if since is None else since) + limit
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise busy(path, limit) from None
                gevent.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)


def lock_path(directory: str) -> str:
    """The run directory's lock file (`run_dir_lock`)."""
    return os.path.join(directory, "run.lock")


def busy(path: str, limit: float) -> RunDirBusy:
    """`RunDirBusy` for lock file `path` not had within `limit` seconds, naming its
    holder (`lock_holder`)."""
    holder = lock_holder(path)
    return RunDirBusy(errno.EAGAIN, f"the run directory's lock {path} is still held by "
                      f"{holder or 'another process'} after {limit:g} s")


def lock_holder(path: str) -> str | None:
    """The holder of the `flock` on file `path` ("process PID"), as ``/proc/locks``
    shows it; None when it cannot be read (no ``/proc``, a holder in another pid namespace)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    file = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open(PROC_LOCKS, "rb") as table:
            for line in table:
                fields = line.decode(errors="replace").split()
                # "1: FLOCK  ADVISORY  WRITE 4242 00:2b:1234 0 EOF" (a waiter's: "1: -> FLOCK")
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file \
                        and fields[4].isascii() and fields[4].isdigit() \
                        and int(fields[4]) > 0:
                    return f"process {fields[4]}"
    except OSError:
        return None
    return None


def _hung_up(sock: socket.socket) -> bool:
    """Whether the client closed its connection already (POLLHUP: gone, not just
    done sending, as after ``shutdown(SHUT_WR)``); asked without waiting."""
    import select

    from gevent.monkey import get_original

    poll = get_original("select", "poll")()  # the process's own, patched or not
    poll.register(sock.fileno(), select.POLLHUP)
    return any(events & select.POLLHUP for _, events in poll.poll(0))


def _short_error(exc: OSError) -> str:
    """An OSError as its message alone (``Is a directory``), else its repr."""
    return exc.strerror or _short(exc)


def _short(exc: BaseException) -> str:
    """An exception as one short printable line (for a reply and the log)."""
    return repr(exc)[:200].encode("ascii", "backslashreplace").decode()


def _read_command(sock: socket.socket, deadline: float) -> str:
    """The first line a client sends (at most `MAX_COMMAND` bytes), read until
    `deadline` in all: a client trickling bytes cannot hold a slot longer."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_COMMAND:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("control command not sent in time")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
    return b"".join(chunks).split(b"\n", 1)[0].decode("utf-8", "replace").strip()


# client side --------------------------------------------------------------------
def ask(path: str, command: str, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any] | None:
    """One worker's reply to `command`, or None if it is gone or does not answer."""
    return ask_why(path, command, timeout)[0]


def ask_why(path: str, command: str, timeout: float = CONTROL_TIMEOUT
            ) -> tuple[dict[str, Any] | None, str]:
    """(reply, "") or (None, why): "gone" when no worker listens there any more
    (it exited), else what went wrong ("no answer within 2.0s"...)."""
    return decoded(*ask_raw(path, command, timeout))


def ask_raw(path: str, command: str, timeout: float = CONTROL_TIMEOUT
            ) -> tuple[bytes | None, str]:
    """`ask_why`'s reply as the bytes the worker sent (not decoded)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None, "gone"
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), ""
    except TimeoutError:
        return None, f"no answer within {timeout:g}s"
    except OSError as exc:
        return None, "gone" if no_one_listens(path) else f"no usable answer: {exc}"
    finally:
        sock.close()


def no_one_listens(path: str) -> bool:
    """Whether no worker listens at `path` any more: an ask that broke (reset) as
    the worker closed its socket at its exit (`ControlServer.close`, the file
    removed just after) is "gone", as one made after. Bug: a write during a
    reload answered 202, naming the worker that had just ended its drain (it
    serves nobody) as not serving the write."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(CONTROL_TIMEOUT)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def decoded(raw: bytes | None, why: str, pause: Callable[[], None] | None = None
            ) -> tuple[dict[str, Any] | None, str]:
    """`ask_raw`'s answer as `ask_why`'s: a JSON object, or None and why (bug: an
    answer of another shape, ``[]``, raised in the management process's loops and
    API calls that asked every worker); one in lines (``"lines": true``: see
    `encode`) decoded a line at a time, calling `pause` between two."""
    if raw is None:
        return None, why
    try:
        reply = json.loads(raw) if b"\n" not in raw else _from_lines(raw, pause)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        return None, f"no usable answer: {exc}"
    if not isinstance(reply, dict):
        return None, f"no usable answer: not a JSON object ({type(reply).__name__})"
    return reply, ""


def _from_lines(raw: bytes, pause: Callable[[], None] | None) -> dict[str, Any]:
    """The reply an answer in lines carries, its hosts put back. An answer cut
    short (or with more) is refused: its line count says how many follow."""
    end = raw.index(b"\n")
    reply = json.loads(raw[:end])
    hosts, count = reply["stats"]["hosts"], reply.pop("lines")
    if not isinstance(hosts, dict) or type(count) is not int:
        raise ValueError("no hosts object or no count of lines")
    for n in range(count):
        if n and pause is not None:
            pause()
        start, end = end + 1, raw.index(b"\n", end + 1)  # ValueError: cut short
        part = json.loads(raw[start:end])
        if not isinstance(part, dict):
            raise ValueError("a line of hosts is not a JSON object")
        hosts.update(part)
    if end + 1 != len(raw):
        raise ValueError(f"more than the {count} lines of hosts announced")
    return reply  # type: ignore[no-any-return]


def pid_of(path: str) -> int | None:
    """The worker pid a control socket path names."""
    stem = Path(path).stem
    digits = stem.rpartition("-")[2]
    return int(digits) if digits.isdecimal() else None


def worker_sockets(directory: str) -> list[str]:
    """The control sockets of the workers alive now (stale ones fail at `ask`); none
    in a directory that is not the run directory any more (`run_dir_problem`)."""
    if run_dir_problem(directory) is not None:
        return []
    return sorted(str(p) for p in Path(directory).glob(WORKER_GLOB))


def run_dir_problem(directory: str) -> str | None:
    """Why `directory` cannot be used as the run directory (how a sentence about it
    goes on), or None: it must be a directory (not a symlink) that this process's
    user owns and nobody else may enter. Bug: deleted under a running balancer
    (``rm -rf /tmp/balancer-*``, systemd-tmpfiles), its name in the shared /tmp
    was anyone's to take; the processes still used it by name, and a local user
    who made it again could listen as a worker (commands, certificates handed
    over) and have the arbiter write through a symlink planted there."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return "is gone (deleted?)"
    except OSError as exc:
        return f"cannot be looked at ({exc.strerror or exc})"
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        return "is not this balancer's (made again by another user, or its owner or " \
               "mode changed): remove it"
    return None
