"""How a file store follows its file (`FileWatching.watch`, mixed into
`balancer.stores.file.FileStore`).

Invariants:
* `watch` re-reads the file when its (inode, size, mtime, ctime) changes,
  polled every `POLL_INTERVAL`; a corrupt file is reported once per distinct
  problem and the last good table stays in force. The file starts with its
  version (``{"version": N, "hosts": ...``), so a watcher whose consumer
  already serves version N (told directly by the management process) skips
  parsing a big table it has, unless the file does not end as this store ends
  it (cut short) or a problem is being reported: only a whole read clears one.
* An unexpected exception in a look at the file is reported and the file read
  again after a pause (`balancer.restarts.Restarts`); the watch goes on.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from balancer.restarts import nap
from balancer.stores.atomic import open_regular
from balancer.stores.base import (
    CorruptStore,
    ProblemLog,
    Store,
    StoreUnavailable,
    TableData,
    watcher_restarts,
)
from balancer.stores.snapshot import HOW_TO_FIX

log = logging.getLogger("balancer.store.file")

POLL_INTERVAL = 0.25
PEEK_BYTES = 64
DIRECT_GRACE = 0.2  # seconds a watcher waits for a write to arrive directly (`_told_directly`)
_VERSION_FIRST = re.compile(rb'\s*\{\s*"version"\s*:\s*(\d{1,18})\s*,')
# how `balancer.stores.file._Lines.encode` ends a table, or an empty one
_ENDS = (b"\n}}\n", b'"hosts": {}}\n')


class FileWatching(Store):
    """`watch` for `FileStore`, which provides what is declared here."""

    path: str
    _problem: str | None

    if TYPE_CHECKING:
        def _signature(self) -> tuple[int, ...] | None: ...

    def watch(self, on_change: Callable[[Any], None], stop: Callable[[], bool],
              served: Callable[[], int] | None = None) -> None:
        problems = ProblemLog(log, self.quiet)
        restarts = watcher_restarts(self.display_url, log, self.quiet)
        seen: tuple[int, ...] | None = None
        delivered: TableData | None = None
        while not stop():
            try:
                seen, delivered = self._poll(seen, delivered, on_change, problems, served)
            except Exception as exc:  # a bug: reported, and the file read again (module doc)
                self._failure = self._found(restarts.failed(exc))
                seen = None
                nap(restarts.pause, stop)
                continue
            time.sleep(POLL_INTERVAL)

    def _poll(self, seen: tuple[int, ...] | None, delivered: TableData | None,
              on_change: Callable[[Any], None], problems: ProblemLog,
              served: Callable[[], int] | None
              ) -> tuple[tuple[int, ...] | None, TableData | None]:
        """One look at the file: read it again if it changed. Returns the file's
        signature seen and the table now in force."""
        signature = self._signature()
        if signature is None:
            problems.report(self._found(f"{self.path}: cannot read the routing table file "
                                        f"(deleted?); keeping the last good table. If it "
                                        f"is gone, {HOW_TO_FIX}"))
            return None, delivered
        if signature != seen and (served is None or self._problem is not None
                                  or not _told_directly(self._peek_version(), served)):
            delivered = self._reread(delivered, on_change, problems, served)
        return signature, delivered

    def _peek_version(self) -> int | None:
        """The version at the start of the file (as this store writes it), or None;
        None too when the file does not end as this store ends it (`_ENDS`: a rule
        is one line, so only the whole file ends so). Bug: a file cut short
        (truncated by a full disk or an interrupted copy) at the version served was
        taken as read, unreported, and a problem reported before it was cleared as
        "readable again"; so was one cut just after a rule's ``}``."""
        try:
            with open_regular(self.path) as f:
                head = f.read(PEEK_BYTES)
                f.seek(max(0, os.fstat(f.fileno()).st_size - PEEK_BYTES))
                tail = f.read(PEEK_BYTES)
        except OSError:
            return None
        match = _VERSION_FIRST.match(head)
        return int(match.group(1)) if match and tail.endswith(_ENDS) else None

    def _reread(self, delivered: TableData | None, on_change: Callable[[TableData], None],
                problems: ProblemLog, served: Callable[[], int] | None) -> TableData | None:
        """Load after a change; deliver it if it differs, or is behind the version the
        consumer serves (an older copy put back: the consumer judges the loss). Returns
        the table now in force."""
        try:
            data = self.load()
        except (CorruptStore, StoreUnavailable) as exc:
            self._found(str(exc))
            problems.report(f"{exc}; keeping the last good table")
            return delivered
        self._problem = None
        problems.clear(f"{self.path}: readable again (version {data.version})")
        if data == delivered and (served is None or data.version >= served()):
            return delivered
        try:
            on_change(data)
        except Exception:
            log.exception("applying version %s from %s failed", data.version, self.path)
        return data


def _told_directly(version: int | None, served: Callable[[], int]) -> bool:
    """Whether the consumer serves `version` already, or does within `DIRECT_GRACE`
    (the management process tells its workers of its own writes directly, right
    after the rename: reading a big file for them would only repeat that)."""
    if version is None or served() < 0:
        return False  # nothing served yet: read it
    deadline = time.monotonic() + DIRECT_GRACE
    while served() < version and time.monotonic() < deadline:
        time.sleep(DIRECT_GRACE / 20)
    return served() == version
