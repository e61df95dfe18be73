"""The management process's watch on the store's certificates (SPEC §9).

Workers keep serving their certificates when the store's cannot be read
(`balancer.tls.follow`) and log that at debug level; this watch is where the
balancer says so once, at error level, with what to do, and where the API and
the dashboard read it (`problem`: ``store.certs_problem`` in ``/api/v1/info``).
It also keeps the certificates last read in good order (`Certs.last_good`),
which `POST /api/v1/restore` writes back when the store lost or damaged them,
and which it hands to this balancer's workers that miss them meanwhile
(`spread`: a worker started while the store is damaged, by a crash or a
reload, would otherwise serve none of them).

Invariants:
* It reads through the store's one `Certs` object, the same one the API's
  certificate writes use, so the loss guard (highest version seen, file seen)
  covers those writes from the first second of the process.
* Each distinct problem, and each damaged record, is logged once; the log and
  `problem` never quote stored text (no private key can reach them).
* A management process started while the store is damaged (a reload) has read
  nothing in good order: it takes what the store hides from the one it
  replaces, still running then (`take_over`: ``DIR/certs-management-PID.sock``,
  which answers only while the store is damaged, and only as it judged it).
  Restarted after its own crash, it has no predecessor: it collects them
  from the workers, which still serve them (`collect`: ``certs-collect``,
  answered only while the store is as this process judged it, for the hosts
  the worker itself finds hidden), at start and at each look until a worker
  answered. What it read itself, or took over, is never replaced.
* While the store is damaged, each look asks every worker which of the hosts
  the damage hides it serves no certificate of (``certs-missing``) and sends
  it those (``certs-fill``, `FILL_BATCH` at a time) with the store's signature
  as judged: a worker takes them only while the store is still as it was
  then, and only for hosts it serves none of. Keys travel over the control
  sockets only (the run directory, mode 0700), never to a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import gevent

from balancer.certificates import refused
from balancer.control import ask, ask_why, pid_of, run_dir_problem, worker_sockets
from balancer.restarts import Restarts, nap
from balancer.stores.base import ProblemLog, Store, StoreError
from balancer.stores.certs import CertsCorrupt, CertsLost

log = logging.getLogger("balancer.certs")

INTERVAL = 1.0  # seconds between looks at the store's certificates (as workers)
FILL_BATCH = 100  # certificates per ``certs-fill`` (~5 KB each; a command takes 4 MiB)
HANDOVER_GLOB = "certs-management-*.sock"  # in the run directory (`take_over`)
HANDOVER_TIMEOUT = 5.0  # seconds to answer a successor (a big answer: many keys)
JUDGED_BATCH = 100  # records judged by `refused_records` between two turns of the loop


def handover_path(run_dir: str, pid: int) -> str:
    return os.path.join(run_dir, f"certs-management-{pid}.sock")


class CertsWatch:
    """The state of the store's certificates as the management process last read it."""

    def __init__(self, store: Store, run_dir: str | None = None) -> None:
        self.certs = store.certs()
        self.certs.keep = True
        self.certs.refusing = refused_records
        self.run_dir = run_dir  # the workers' control sockets (`spread`); None: no workers
        self.problem: str | None = None  # why the certificates cannot be read as a whole
        self.failure: str | None = None  # the watch's own last unexpected failure (`run`)
        self.judged = ""  # the repr of the store's signature when last read (`spread`)
        self.stopped = False
        self._seen: object = object()
        self._damaged: dict[str, str] = {}
        self._log = ProblemLog(log)
        self._task: Any = None
        self._server: Any = None
        self.bound = (0, 0)  # the handover socket's (device, inode) (`unbound`)
        self.collected = False  # a worker answered `collect` (asked while damaged)

    def start(self) -> None:
        self.look()
        if self.run_dir is not None:
            self.take_over()
            self.collect()
            self.serve()
        self._task = gevent.spawn(self.run)

    def stop(self) -> None:
        self.stopped = True
        if self._task is not None:
            self._task.kill()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(handover_path(str(self.run_dir), os.getpid()))

    def run(self) -> None:
        """Look, then hand the workers what the store hides, every `INTERVAL`; an
        exception no branch expects is `balancer.restarts`' (bug: one in `look`
        ended the watch for good, ``store.certs_problem`` null; one in `spread`
        was logged with its traceback every second)."""
        looking = Restarts("certificates", log, False, loop="the watch on the store's "
                           "certificates", then="keeping the certificates last read and "
                           "reading them again with backoff")
        spreading = Restarts("certificates", log, False, loop="handing the workers the "
                             "certificates the store hides", then="trying again with backoff")
        while not self.stopped:
            gevent.sleep(INTERVAL)
            try:
                self.look()
            except Exception as exc:
                self.problem = self.failure = looking.failed(exc)
                self._seen = object()
                nap(looking.pause, lambda: self.stopped)
                continue
            try:
                if not self.collected:
                    self.collect()
                self.spread()
            except Exception as exc:
                spreading.failed(exc)
                nap(spreading.pause, lambda: self.stopped)

    def look(self) -> None:
        """Read the certificates if they changed (or while they cannot be read)."""
        try:
            signature = self.certs.signature()
            if signature == self._seen and signature is not None and self.problem is None:
                return  # unchanged (no file / no counter is read each time: lost?)
            self.judged = repr(signature)
            self.certs.all()
        except (CertsCorrupt, CertsLost) as exc:
            self.problem = str(exc)
            self._log.report(f"certificates: {exc}")
            return
        except StoreError as exc:  # unreachable: the routes' watch reports that, unless
            if self.certs.own_outages:  # it is the certificates' own file's problem
                self.problem = str(exc)
                self._log.report(f"certificates: {exc}")
            return
        self._seen = signature
        if self.problem is not None:
            self.problem = None
            self._log.clear("certificates: the store's certificates are readable again")
        self.report_damaged(self.certs.damaged)

    def damage(self) -> str | None:
        """`problem` when the store is damaged, lost or unreadable; None while it is
        the watch's own unexpected failure (`run`), which says nothing of the store:
        nothing for ``POST /api/v1/certs/restore`` to repair (bug: the certificates
        last read were written over the store, one added since by hand or by another
        balancer lost)."""
        return None if self.problem == self.failure else self.problem

    def report_damaged(self, damaged: dict[str, str]) -> None:
        for host, why in damaged.items():
            if self._damaged.get(host) != why:
                log.error("certificate of %s: %s; workers keep the one they served, if "
                          "any (a new worker gets the one this process last read); the "
                          "other hosts are served. Upload it again (PUT /api/v1/certs/%s) "
                          "or delete it", host, why, host)
        self._damaged = dict(damaged)

    def hidden(self) -> dict[str, dict[str, Any]]:
        """HOST → record last read in good order, for the hosts the store's damage
        hides now: all of them while it cannot be read as a whole, else those of
        its damaged records."""
        return self.hidden_of(self.certs.last_good or {})

    def hidden_of(self, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Those of `records` (HOST → record) the store's damage hides now."""
        if self.problem is not None:
            return dict(records)
        return {host: records[host] for host in self._damaged if host in records}

    def spread(self) -> None:
        """Hand each worker the hidden certificates it serves none of (see the
        module doc); a worker that is gone or does not answer is asked again at
        the next look."""
        hidden = self.hidden()
        if not hidden or self.run_dir is None:
            return
        query = "certs-missing " + json.dumps({"hosts": sorted(hidden)})
        for path in worker_sockets(self.run_dir):
            reply = ask(path, query) or {}
            missing = [host for host in reply.get("missing", ()) if host in hidden]
            added = 0
            for start in range(0, len(missing), FILL_BATCH):
                batch = {host: hidden[host] for host in missing[start:start + FILL_BATCH]}
                answer = ask(path, "certs-fill " + json.dumps({"signature": self.judged,
                                                               "hosts": batch})) or {}
                added += int(answer.get("added", 0))
            if added:
                log.warning("certificates: worker %s lacked %d certificates the damaged "
                            "store cannot give; handed it those this process last read in "
                            "good order (the store still needs repairing)", pid_of(path), added)

    # the handover between management processes -------------------------------------
    def serve(self) -> None:
        """Answer successors on ``DIR/certs-management-PID.sock`` (see the module doc)."""
        from gevent.server import StreamServer

        path = handover_path(str(self.run_dir), os.getpid())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a recycled pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(4)
            info = os.stat(path)
        except OSError:
            listener.close()
            raise
        self.bound = (info.st_dev, info.st_ino)
        self._server = StreamServer(listener, self.hand_over)
        self._server.start()

    def rebind(self) -> None:
        """Serve the handover socket again if it is gone (the run directory deleted
        and made again by the arbiter); never once stopped (bug: the arbiter's
        SIGHUP to a management process draining after a reload bound the socket
        that `stop` had removed, and left it there when the process exited)."""
        if not self.unbound():
            return
        self._server.close()
        try:
            self.serve()
        except OSError as exc:  # (no room, a read-only directory): the process goes on
            log.error("certificates: cannot bind the handover socket %s again: %s; a "
                      "management process started while the store is damaged collects the "
                      "certificates from the workers instead",
                      handover_path(str(self.run_dir), os.getpid()), exc.strerror or exc)

    def unbound(self) -> bool:
        """Whether the handover socket went with the run directory, which is there
        again (made again by the arbiter), and is not bound again yet (nor stopped):
        what is at its path now, if anything, is not the socket it bound."""
        if self.stopped or self._server is None or run_dir_problem(str(self.run_dir)):
            return False
        try:
            info = os.stat(handover_path(str(self.run_dir), os.getpid()))
        except OSError:
            return True
        return (info.st_dev, info.st_ino) != self.bound

    def hand_over(self, sock: socket.socket, _address: Any) -> None:
        try:
            sock.settimeout(HANDOVER_TIMEOUT)
            sock.recv(64)  # the question (one line); the answer is the same for any
            sock.sendall(json.dumps({"signature": self.judged,
                                     "certs": self.hidden()}).encode())
        except OSError:
            pass
        finally:
            sock.close()

    def take_over(self) -> None:
        """Take the certificates the damaged store hides, and this process never read
        in good order, from the management process this one replaces."""
        if self.problem is None and not self._damaged or run_dir_problem(str(self.run_dir)):
            return  # (a run directory someone else made again: its sockets are theirs)
        own = handover_path(str(self.run_dir), os.getpid())
        for path in sorted(str(p) for p in Path(str(self.run_dir)).glob(HANDOVER_GLOB)):
            if path == own:
                continue
            reply, why = ask_why(path, "last-good", HANDOVER_TIMEOUT)
            if why == "gone":
                with contextlib.suppress(OSError):
                    os.unlink(path)  # its process ended without removing it
            if reply and reply.get("signature") == self.judged and reply.get("certs"):
                self.adopt(reply["certs"], f"management process {pid_of(path)}, which read "
                                           "them in good order")

    def collect(self) -> None:
        """While the store is damaged, take the certificates it hides, and this
        process has not read nor taken over, from the workers that serve them
        (a management process restarted after its own crash); the latest of
        each host's (`not_after`) when workers differ."""
        if self.problem is None and not self._damaged:
            return
        query = "certs-collect " + json.dumps({"signature": self.judged})
        found: dict[str, dict[str, Any]] = {}
        for path in worker_sockets(str(self.run_dir)):
            certs = (ask(path, query, HANDOVER_TIMEOUT) or {}).get("certs")
            if not isinstance(certs, dict):
                continue
            self.collected = True
            for host, record in certs.items():
                if isinstance(record, dict) and _later(record, found.get(host)):
                    found[host] = record
        if found:
            self.adopt(found, "the workers, which serve them")

    def adopt(self, records: dict[str, dict[str, Any]], source: str) -> None:
        last_good = dict(self.certs.last_good or {})
        taken = {host: record for host, record in self.hidden_of(records).items()
                 if host not in last_good}
        if taken:
            self.certs.last_good = {**last_good, **taken}
            log.warning("certificates: took %d certificates the damaged store cannot give "
                        "from %s (the store still needs repairing)", len(taken), source)


def refused_records(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """HOST → why OpenSSL refuses its record (`balancer.certificates.refused`: the
    first read of a record costs ~200 µs, later ones a hash), `JUDGED_BATCH`
    records at a time, the loop running between (the first read of 20,000
    records takes ~4 s: `/healthz` and the API are answered meanwhile)."""
    found: dict[str, str] = {}
    for number, (host, record) in enumerate(records.items(), 1):
        why = refused(record["chain"], record["key"])
        if why is not None:
            found[host] = why
        if number % JUDGED_BATCH == 0:
            gevent.sleep(0)
    return found


def _later(record: dict[str, Any], than: dict[str, Any] | None) -> bool:
    """Whether `record` expires later than `than` (None: there is none)."""
    if than is None:
        return True
    try:
        return float(record.get("not_after", 0)) > float(than.get("not_after", 0))
    except (TypeError, ValueError):
        return False
