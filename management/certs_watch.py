"""The management process's watch on the store's certificates (SPEC §9).

Workers keep serving their certificates when the store's cannot be read
(`balancer.tls.follow`) and log that at debug level; this watch is where the
balancer says so once, at error level, with what to do, and where the API and
the dashboard read it (`problem`: ``store.certs_problem`` in ``/api/v1/info``).
It also keeps the certificates last read in good order (`Certs.last_good`),
which `POST /api/v1/restore` writes back when the store lost or damaged them.

Invariants:
* It reads through the store's one `Certs` object, the same one the API's
  certificate writes use, so the loss guard (highest version seen, file seen)
  covers those writes from the first second of the process.
* Each distinct problem, and each damaged record, is logged once; the log and
  `problem` never quote stored text (no private key can reach them).
"""

from __future__ import annotations

import logging
from typing import Any

import gevent

from balancer.stores.base import ProblemLog, Store, StoreError
from balancer.stores.certs import CertsCorrupt, CertsLost

log = logging.getLogger("balancer.certs")

INTERVAL = 1.0  # seconds between looks at the store's certificates (as workers)


class CertsWatch:
    """The state of the store's certificates as the management process last read it."""

    def __init__(self, store: Store) -> None:
        self.certs = store.certs()
        self.certs.keep = True
        self.problem: str | None = None  # why the certificates cannot be read as a whole
        self.stopped = False
        self._seen: object = object()
        self._damaged: dict[str, str] = {}
        self._log = ProblemLog(log)
        self._task: Any = None

    def start(self) -> None:
        self.look()
        self._task = gevent.spawn(self.run)

    def stop(self) -> None:
        self.stopped = True
        if self._task is not None:
            self._task.kill()

    def run(self) -> None:
        while not self.stopped:
            gevent.sleep(INTERVAL)
            self.look()

    def look(self) -> None:
        """Read the certificates if they changed (or while they cannot be read)."""
        try:
            signature = self.certs.signature()
            if signature == self._seen and signature is not None and self.problem is None:
                return  # unchanged (no file / no counter is read each time: lost?)
            self.certs.all()
        except (CertsCorrupt, CertsLost) as exc:
            self.problem = str(exc)
            self._log.report(f"certificates: {exc}")
            return
        except StoreError:
            return  # unreachable: the routes' watch reports that
        self._seen = signature
        if self.problem is not None:
            self.problem = None
            self._log.clear("certificates: the store's certificates are readable again")
        self.report_damaged(self.certs.damaged)

    def report_damaged(self, damaged: dict[str, str]) -> None:
        for host, why in damaged.items():
            if self._damaged.get(host) != why:
                log.error("certificate of %s: %s; workers keep the one they served, if "
                          "any (a new worker serves none); the other hosts are served. "
                          "Upload it again (PUT /api/v1/certs/%s) or delete it",
                          host, why, host)
        self._damaged = dict(damaged)
